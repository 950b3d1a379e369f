"""Shared fixtures: real local services, started here, bounded in time, stopped by PID.

- ``ray_local``: one local Ray for the whole session (Ray is slow to start).
- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (sqlite store, served artifacts).
- ``moto_s3`` / ``s3_bucket`` (fixtures_s3.py): moto's standalone S3 server on 127.0.0.1.
"""

from __future__ import annotations


import pytest
from helpers.services import start_mlflow_server, stop_process_group

pytest_plugins = ["helpers.fixtures_s3"]

# The fast tier (``pytest -m "not slow"``) leaves out every test that starts Ray, a server
# or a subprocess, or trains a model: by the fixtures it uses, by module, or by its own mark.
SLOW_FIXTURES = {"ray_local", "mlflow_server", "moto_s3"}
SLOW_MODULES = {"test_distributed.py"}  # DDP process groups (test_cli marks its subprocess tests)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)



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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pre-training checkpoint made by hand (:func:`helpers.factories.hand_made_checkpoint`)."""
    from helpers.factories import hand_made_checkpoint

    return hand_made_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A module's own MLflow store (sqlite), embeddings cache and Ray Train storage."""
    root = tmp_path_factory.mktemp("store")
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "cache": str(root / "cache"), "runs": str(root / "runs")}
