"""Entrypoint for ``ray job submit``: the whole downstream evaluation and its table.

    ray job submit --working-dir . -- python jobs/downstream.py --config jobs/configs/downstream.yaml \
        encoder_ref=s3://my-bucket/runs/cola-a/checkpoint_000100000
    ray job submit --working-dir . -- python jobs/downstream.py --config jobs/configs/downstream-smoke.yaml \
        encoder_ref=/shared/runs/smoke-job/checkpoint_000000006

Every task x baseline (random init and COLA frozen: probe sweeps; supervised and COLA
fine-tuned: fine-tuning sweeps), one MLflow experiment, then report.md / report.csv /
report.png (also logged to MLflow). ``key=value`` and ``probe.key=value`` override the YAML
(the keyword arguments of ``cola_ray.downstream.suite.run_suite``). The driver connects to the
cluster it was submitted to (Ray sets RAY_ADDRESS). Cells already finished in the
experiment are skipped, so resubmitting after a failure picks up where the suite stopped.
"""

import sys
from pathlib import Path

# With --working-dir the repo is the job's working directory; make the package importable
# even where it was not pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cola_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["suite", *sys.argv[1:]]))
