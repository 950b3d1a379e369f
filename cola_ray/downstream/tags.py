"""The names downstream runs are filed under in MLflow (no heavy imports: the CLI's parser
reads them)."""

BASELINES = ("log-mel", "random init", "supervised", "COLA frozen", "COLA fine-tuned")
"""The paper's Table 1 columns after the hand-made features (``--encoder logmel``), which
show what learning adds; every probe / sweep run is tagged with one."""
TASK_TAG = "cola_ray.task"
BASELINE_TAG = "cola_ray.baseline"
KIND_TAG = "cola_ray.kind"
ENCODER_TAG = "cola_ray.model.encoder"
DEFAULT_EXPERIMENT = "cola-ray-downstream"
