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

# What a downstream run measured (cola_ray.downstream.encoders.lineage): set on every probe,
# fine-tune, sweep parent and trial, and on a report of one pre-training run. Only the tags
# that apply are set: a log-mel or random-init run has no pre-training run or step.
ENCODER_KIND_TAG = "cola_ray.encoder.kind"
"""checkpoint, export, mlflow-model, random or features (resolve_encoder's info["kind"])."""
PRETRAIN_RUN_TAG = "cola_ray.pretrain.run_id"
PRETRAIN_RUN_NAME_TAG = "cola_ray.pretrain.run_name"
PRETRAIN_EXPERIMENT_TAG = "cola_ray.pretrain.experiment_id"
CHECKPOINT_STEP_TAG = "cola_ray.pretrain.step"
"""The pre-training step of the checkpoint that was measured."""
ARCHITECTURE_FROM_TAG = "cola_ray.architecture_from"
"""The supervised baseline (fine-tuned from scratch) takes only the architecture of its
encoder reference, so it names that reference here instead of a pre-training run."""
NOTE_TAG = "mlflow.note.content"
"""The run's description in the MLflow UI (markdown)."""
