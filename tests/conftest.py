"""Shared fixtures: real local services, started here, bounded in time, stopped by PID.

- ``ray_local``: one local Ray for the whole session (Ray is slow to start).
- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (sqlite store, served artifacts).
- ``moto_s3`` / ``s3_bucket`` (fixtures_s3.py): moto's standalone S3 server on 127.0.0.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers.services import start_mlflow_server, stop_process_group

pytest_plugins = ["helpers.fixtures_s3"]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_local(moto_s3):
    """A local Ray with 2 CPUs, shared by every test that needs one.

    Started after the S3 server so Ray's workers inherit its endpoint and test
    credentials from the environment, exactly as on a cluster node.
    """
    import ray

    if not ray.is_initialized():
        # address="local": never attach to another cluster on this machine (a `ray start`
        # elsewhere leaves /tmp/ray/ray_current_cluster, which address=None would follow).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    proc, uri = start_mlflow_server(root, str(root / "artifacts"))
    try:
        yield uri
    finally:
        stop_process_group(proc)
