"""Bad input fails fast and clearly: unreachable services, resources the cluster lacks.

- An unreachable Ray head, S3 endpoint or MLflow server: ``fit`` raises ``ConnectionError``
  naming the address (credentials masked) within seconds, before any work starts
  (``ray.init`` alone waits indefinitely for a dead head; boto3 and MLflow retry).
- MLflow's own client, once training runs, gives up on a dead server in bounded time.
- A training worker or decode task asking for resources no node has: ``ResourceError``
  naming the config key, before training starts (not a silent pending placement group).
"""

from __future__ import annotations

import time

import pytest

from helpers.factories import make_shards
from cola_ray.config import load_config
from cola_ray.train.cluster import ResourceError, check_resources
from cola_ray.train.trainer import fit

BOUND_S = 60.0


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    return make_shards(root, n_clips=8, seconds=1.0, seed=3, max_samples=8, labels=False)


def cfg_with(tmp_path, shards_path, *extra):
    return load_config(None, [
        f"data.shards={shards_path}", "data.decode_num_cpus=0.5", "model.encoder=test_efficientnet",
        "model.proj_dim=16", "train.batch_size=4", "train.num_workers=2", "train.cpus_per_worker=0.5",
        "train.max_steps=1", f"storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra,
    ])


def _fails_fast(cfg, exc, *names):
    t0 = time.monotonic()
    with pytest.raises(exc) as err:
        fit(cfg, echo=lambda *_: None)
    took = time.monotonic() - t0
    assert took < BOUND_S, f"took {took:.0f}s"
    for name in names:
        assert name in str(err.value), str(err.value)
    return str(err.value)


@pytest.fixture
def no_ray_yet(monkeypatch):
    """fit() only connects (and probes the address) when Ray is not up in this process yet;
    the session's ``ray_local`` may be, so pretend it is not (the probe fails before ray.init)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def test_unreachable_ray_address(tmp_path, small_shards, no_ray_yet):
    msg = _fails_fast(cfg_with(tmp_path, small_shards, "ray_address=127.0.0.1:1"), ConnectionError,
                      "127.0.0.1:1", "ray_address")
    assert "Ray cluster" in msg


def test_unreachable_ray_address_from_env(tmp_path, small_shards, no_ray_yet, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    _fails_fast(cfg_with(tmp_path, small_shards), ConnectionError, "127.0.0.1:1", "RAY_ADDRESS")


def test_unreachable_ray_client_address(tmp_path, small_shards, no_ray_yet):
    _fails_fast(cfg_with(tmp_path, small_shards, "ray_address=ray://127.0.0.1:1"), ConnectionError,
                "ray://127.0.0.1:1")


def test_unreachable_mlflow_server_names_uri_without_password(tmp_path, small_shards):
    msg = _fails_fast(
        cfg_with(tmp_path, small_shards, "tracking.tracking_uri=http://alice:canary-pw@127.0.0.1:1"),
        ConnectionError, "http://alice:***@127.0.0.1:1", "MLflow")
    assert "canary-pw" not in msg


def test_unreachable_s3_endpoint(tmp_path):
    cfg = cfg_with(tmp_path, "s3://some-bucket/shards", "data.s3_endpoint_url=http://127.0.0.1:1")
    _fails_fast(cfg, ConnectionError, "http://127.0.0.1:1", "S3 endpoint")


def test_mlflow_client_gives_up_on_a_dead_server_in_bounded_time():
    """Once training runs, a dead server costs a bounded wait (MLFLOW_HTTP_REQUEST_* set in tracking)."""
    from mlflow.exceptions import MlflowException

    from cola_ray.train.tracking import RunLogger

    logger = RunLogger("http://127.0.0.1:1", "0" * 32)
    t0 = time.monotonic()
    with pytest.raises(MlflowException) as err:
        logger.log_metrics({"loss": 1.0}, step=1)
    assert time.monotonic() - t0 < BOUND_S
    assert "127.0.0.1:1" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("override, names", [
    ("train.resources_per_worker={gpu-node: 1}", ["gpu-node", "train.resources_per_worker"]),
    ("train.use_gpu=true", ["GPU", "train.use_gpu"]),
    ("train.cpus_per_worker=4", ["CPU: 4", "train.cpus_per_worker"]),
    ("data.decode_resources={decode-node: 0.01}", ["decode-node", "data.decode_resources"]),
    ("data.decode_num_cpus=3", ["CPU: 3", "data.decode_num_cpus"]),
])
def test_resources_the_cluster_lacks_fail_before_training(ray_local, tmp_path, small_shards, override, names):
    cfg = cfg_with(tmp_path, small_shards, override)
    with pytest.raises(ResourceError) as err:
        check_resources(cfg)
    for name in names:
        assert name in str(err.value), str(err.value)


@pytest.mark.slow
def test_too_many_workers_for_a_fixed_cluster(ray_local, tmp_path, small_shards):
    cfg = cfg_with(tmp_path, small_shards, "train.num_workers=4", "train.cpus_per_worker=1")
    with pytest.raises(ResourceError, match=r"train.num_workers=4 .*room for 2"):
        check_resources(cfg)


@pytest.mark.slow
def test_an_autoscaler_config_counts_node_types_not_up_yet(ray_local, tmp_path, small_shards):
    """An autoscaling cluster (autoscaler v2, KubeRay) publishes its node types in the GCS:
    internal KV ``__autoscaler_cluster_config`` in namespace ``__autoscaler``, a serialized
    ``autoscaler_pb2.ClusterConfig``. Planted here in this Ray's real GCS as the autoscaler
    writes it (and removed after): a request that only a node type not up yet can serve
    passes, however many workers; one no launchable type can serve fails naming that."""
    import ray._raylet as raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 96, "GPU": 8, "gpu-node": 1}, max_count=2),
        autoscaler_pb2.NodeGroupConfig(name="decode", resources={"CPU": 64, "decode-node": 1}, max_count=8),
        autoscaler_pb2.NodeGroupConfig(name="off", resources={"CPU": 8, "tpu": 4}, max_count=0),  # never launched
    ])
    key, namespace = raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    on_gpu_nodes = ("train.use_gpu=true", "train.resources_per_worker={gpu-node: 0.125}",
                    "data.decode_resources={decode-node: 1}", "train.num_workers=16", "train.batch_size=32")
    with pytest.raises(ResourceError, match="gpu-node"):  # this cluster's live nodes have none
        check_resources(cfg_with(tmp_path, small_shards, *on_gpu_nodes))
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        check_resources(cfg_with(tmp_path, small_shards, *on_gpu_nodes))
        with pytest.raises(ResourceError, match=r"tpu.*any node type the autoscaler may launch"):
            check_resources(cfg_with(tmp_path, small_shards, "train.resources_per_worker={tpu: 1}"))
    finally:
        _internal_kv_del(key, namespace=namespace)
    with pytest.raises(ResourceError, match="gpu-node"):  # gone again: the live nodes count
        check_resources(cfg_with(tmp_path, small_shards, *on_gpu_nodes))


@pytest.mark.slow
def test_fit_checks_resources_before_training_and_switch_turns_it_off(ray_local, tmp_path, small_shards,
                                                                      monkeypatch):
    from mlflow.tracking import MlflowClient

    cfg = cfg_with(tmp_path, small_shards, "train.resources_per_worker={gpu-node: 1}")
    _fails_fast(cfg, ResourceError, "gpu-node")
    # Nothing started: no MLflow run was created.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cola-ray")
    assert exp is None or not client.search_runs([exp.experiment_id])
    check_resources(cfg_with(tmp_path, small_shards))  # the same cluster, a request it can serve
    monkeypatch.setenv("COLA_RAY_RESOURCE_CHECK", "off")
    check_resources(cfg)  # autoscaling clusters that do not publish their node types
