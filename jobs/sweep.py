"""Entrypoint for ``ray job submit``: a tracked probe sweep with a config from jobs/configs/.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep.yaml \
        encoder_ref=s3://my-bucket/runs/cola-a/checkpoint_000100000 task=s3://my-bucket/tasks/spc1
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep.yaml \
        encoder_ref=random:efficientnet_b0 task=s3://my-bucket/tasks/spc1 num_samples=32 max_concurrent=8

``key=value`` overrides any key of the YAML (the keyword arguments of
``cola_ray.downstream.sweep.sweep``). The job's driver connects to the cluster it was submitted to
(Ray sets RAY_ADDRESS); it embeds the task once (cached), runs the Tune trials, and
prints the selected config and its test accuracy.
"""

import argparse
import sys
from pathlib import Path

# With --working-dir the repo is the job's working directory; make the package importable
# even where it was not pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cola_ray.config import ConfigError  # noqa: E402
from cola_ray.downstream.sweep_config import describe, load_sweep_config, run_sweep  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML (see jobs/configs/sweep.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. task=s3://bucket/tasks/spc1 num_samples=16")
    args = parser.parse_args(argv)
    try:
        settings = load_sweep_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    print(describe(run_sweep(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
