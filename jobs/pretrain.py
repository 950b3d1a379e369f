"""Entrypoint for ``ray job submit``: pre-train COLA with a config from jobs/configs/.

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/smoke.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/paper.yaml \
        data.shards=s3://my-bucket/audioset storage_path=s3://my-bucket/runs

The job's driver connects to the cluster it was submitted to (Ray sets RAY_ADDRESS). It runs
with the cluster's environment, not the submitting shell's: ``${VAR}`` references in the config
resolve on the cluster, so pass paths as ``key=value`` overrides (or ``--runtime-env-json
'{"env_vars": {...}}'``). Relative paths resolve inside the job's unpacked working dir (in Ray's
session temp dir, garbage-collected by Ray, on one node only): give storage and tracking as
absolute or ``s3://`` paths.
"""

import sys
from pathlib import Path

# With --working-dir the repo is the job's working directory; make the package importable
# even where it was not pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cola_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
