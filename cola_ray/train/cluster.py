"""Connecting the driver to Ray, and checking the cluster can run what a config asks.

The cluster is ``ray_address`` (config), else ``RAY_ADDRESS`` (set by ``ray job submit``),
else a new local Ray for this process: never some other cluster that happens to run on
this machine (``ray.init()`` with no address would follow the last ``ray start``).
Unreachable addresses and resources no node can provide fail here, before training,
naming the setting, instead of hanging in ``ray.init`` or waiting forever for resources.
"""

from __future__ import annotations

import math
import os
import socket
from urllib.parse import urlparse

import ray

from cola_ray.data import storage
from cola_ray.train import tracking
from cola_ray.config import Config, ConfigError

PROBE_TIMEOUT_S = 10.0
"""How long the driver waits for a TCP connection to the Ray head or the S3 endpoint."""
RESOURCE_CHECK_ENV = "COLA_RAY_RESOURCE_CHECK"
"""``auto`` (default), ``off``; see :func:`check_resources`."""


class ResourceError(ConfigError):
    """The config asks for Ray resources the cluster cannot provide; the message names the key."""


def ray_address(address: str = "") -> str:
    """The address to connect to: the argument, else ``RAY_ADDRESS``, else ``local``."""
    return address or os.environ.get("RAY_ADDRESS", "") or "local"


def connect(address: str = "") -> None:
    """``ray.init`` on :func:`ray_address` unless Ray is already initialised in this process."""
    if ray.is_initialized():
        return
    target = ray_address(address)
    check_ray_address(target)
    ray.init(address=target)
    from cola_ray.console import filter_worker_logs, quiet_ray

    quiet_ray()  # Ray Data's INFO chatter to its log file, not this console (unless COLA_RAY_VERBOSE)
    filter_worker_logs()  # and the other processes' known-harmless lines (they stay in their files)


def on_driver_node() -> dict:
    """Actor options that pin a run's bookkeeping actor (tallies, ledger, progress board)
    to the driver's node: it must outlive the loss of any worker node. Hard, not soft: a
    soft affinity once placed the ledger on a worker node (CI, multinode test) and the node's
    loss took it along. They ask for no CPU, so the driver's node always has room."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                 soft=False)}


def _probe_tcp(url: str, what: str, default_port: int) -> None:
    """Open (and close) a TCP connection to ``url``'s host:port, or raise ConnectionError naming it."""
    parsed = urlparse(url if "://" in url else "tcp://" + url)
    try:
        host, port = parsed.hostname, parsed.port or default_port
    except ValueError as e:  # a port that is not a number
        raise ConfigError(f"{what} {tracking.redact(url)!r} is not host:port: {e}") from None
    if not host:
        raise ConfigError(f"{what} {tracking.redact(url)!r} names no host")
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(
            f"cannot reach {what} at {tracking.redact(url)} ({host}:{port}) within "
            f"{PROBE_TIMEOUT_S:.0f}s: {e}"
        ) from None


def check_ray_address(address: str = "") -> None:
    """A given ``host:port`` (or ``ray://host:port``) must accept connections."""
    if ray.is_initialized():
        return
    address = ray_address(address)
    if address in ("auto", "local") or address.startswith("http"):
        return
    default = 10001 if address.startswith("ray://") else 6379
    _probe_tcp(address, "the Ray cluster (ray_address / RAY_ADDRESS)", default)


def check_s3_endpoint(cfg: Config) -> None:
    """A custom S3 endpoint (config or AWS_ENDPOINT_URL*) must accept connections when S3 is used."""
    if not (storage.is_s3(cfg.data.shards) or storage.is_s3(cfg.storage_path)):
        return
    endpoint = storage._endpoint(cfg.data.s3_endpoint_url)
    if endpoint:
        default = 80 if endpoint.startswith("http://") else 443
        _probe_tcp(endpoint, "the S3 endpoint (data.s3_endpoint_url / AWS_ENDPOINT_URL)", default)


def check_resources(cfg: Config) -> None:
    """Fail before training starts if the cluster can never run a training worker or a decode task.

    Rule: a training worker asks ``{CPU: train.cpus_per_worker, GPU: 1 if train.use_gpu,
    **train.resources_per_worker}`` and a decode task ``{CPU: data.decode_num_cpus,
    **data.decode_resources}``, each on ONE node. They are compared with

    - the largest node the autoscaler may launch, when the cluster publishes an autoscaler
      config (autoscaler v2, KubeRay): nodes that are not up yet still count;
    - otherwise the nodes alive now (a fixed cluster): all ``train.num_workers`` workers
      must fit on them at once.

    A cluster whose autoscaler does not publish its config (the v1 autoscaler of
    ``ray up``) may add nodes the driver cannot see: set ``COLA_RAY_RESOURCE_CHECK=off``
    there (or start the run once the nodes are up).
    """
    mode = os.environ.get(RESOURCE_CHECK_ENV, "auto").strip().lower()
    if mode == "off":
        return
    worker = {"CPU": cfg.train.cpus_per_worker, **cfg.train.resources_per_worker}
    if cfg.train.use_gpu and "GPU" not in cfg.train.resources_per_worker:
        worker["GPU"] = 1.0
    decode = {"CPU": cfg.data.decode_num_cpus, **cfg.data.decode_resources}
    worker = {k: float(v) for k, v in worker.items() if v}
    decode = {k: float(v) for k, v in decode.items() if v}

    launchable = _autoscaler_node_types()
    if launchable is not None:
        nodes, where = launchable, "any node type the autoscaler may launch"
    else:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        where = "the cluster's nodes (" + "; ".join(_describe(n) for n in nodes) + ")"

    def fits(bundle: dict[str, float], node: dict[str, float]) -> int:
        return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()), default=1 << 30)

    keys = "train.cpus_per_worker / train.use_gpu / train.resources_per_worker"
    capacity = sum(fits(worker, n) for n in nodes)
    if capacity == 0:
        raise ResourceError(
            f"no node can host a training worker asking {_describe(worker)} ({keys}); {where}")
    if launchable is None and capacity < cfg.train.num_workers:
        raise ResourceError(
            f"train.num_workers={cfg.train.num_workers} workers asking {_describe(worker)} each ({keys}) "
            f"do not fit: room for {capacity} on {where}")
    if not any(fits(decode, n) for n in nodes):
        raise ResourceError(
            f"no node can host a decode task asking {_describe(decode)} "
            f"(data.decode_num_cpus / data.decode_resources); {where}")
    evaluation = {k: float(v) for k, v in {"CPU": cfg.eval.num_cpus, "GPU": cfg.eval.num_gpus}.items() if v}
    if cfg.eval.every_steps and cfg.eval.mode == "async" and not any(fits(evaluation, n) for n in nodes):
        raise ResourceError(
            f"no node can host the online-evaluation task asking {_describe(evaluation)} "
            f"(eval.num_cpus / eval.num_gpus; eval.mode=inline needs none); {where}")


def _autoscaler_node_types() -> list[dict[str, float]] | None:
    """Resources of each node type of a published autoscaler config, or None if there is none."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # private API: treat any failure as "no autoscaler config"
        return None
    if config is None or not config.node_group_configs:
        return None
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


def _describe(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())
                           if not k.startswith(("node:", "memory", "object_store_memory"))) + "}"
