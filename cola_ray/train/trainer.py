"""fit(cfg): the driver side of pre-training.

Builds the streaming pair dataset, opens the MLflow run, and hands both to a
``TorchTrainer`` whose workers run :func:`cola_ray.train.loop.train_loop_per_worker`.
A run lives in ``<storage_path>/<name>`` (local or s3://); starting a run with the name
of one that has checkpoints there resumes it (Ray Train restores the latest checkpoint,
and the MLflow run with that name continues).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cola_ray.train import cluster, tracking
from cola_ray.data import storage
from cola_ray.config import Config, ConfigError
from cola_ray.data.pipeline import SampleCounter, list_shards, read_pairs
from cola_ray.train.checkpoint import CheckpointError, checkpoint_folders, read_state_at
from cola_ray.train.loop import check_resume, train_loop_per_worker

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
@dataclass
class FitResult:
    run_name: str
    run_dir: str
    tracking_uri: str
    mlflow_run_id: str
    checkpoint: str | None
    metrics: dict[str, Any]
    resumed: bool


def fit(cfg: Config, *, echo=print) -> FitResult:
    """Pre-train COLA as ``cfg`` says; returns where the run and its checkpoints are."""
    cfg.validate()
    # Bad input fails here, within seconds and naming the thing, before Ray starts: an
    # unreachable service (not after minutes of client retries; ray.init alone waits
    # indefinitely for a dead head) or a missing shard path or bucket.
    cluster.check_s3_endpoint(cfg)
    cfg = _resolve_shards(cfg, echo)
    urls = list_shards(cfg.data)
    tracking.check_server(tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
    cluster.check_ray_address(cfg.ray_address)
    fs, root = _storage(cfg)
    name = _run_name(cfg, fs, root)
    run_dir = f"{cfg.storage_path.rstrip('/')}/{name}"
    # Where this run's checkpoints are, as the driver and the workers read them.
    checkpoint_dir = run_dir if storage.is_s3(run_dir) else os.path.join(root, name)
    _check_resume_early(cfg, checkpoint_dir)

    cluster.connect(cfg.ray_address)
    # Per-epoch progress bars of the streaming split drown the log; MLflow has the progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster.check_resources(cfg)
    # On the driver's node: the run's tallies must outlive the loss of any worker node.
    dataset_counter = SampleCounter.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=True)).remote()
    datasets = {"train": read_pairs(cfg.data, dataset_counter, urls)}

    uri, run_id, resumed = tracking.start_or_resume_run(cfg, name, tags={"cola_ray.run_dir": run_dir})
    echo(f"MLflow: {tracking.run_url(uri, run_id, cfg.tracking.experiment)}")
    echo(f"Checkpoints: {run_dir}" + ("  (resuming)" if resumed else ""))
    spool_dir = _spool_dir(cfg, name)

    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.resources_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            # Credentials in URLs are masked: the workers' copy ends up in every checkpoint's
            # state.json (and its MLflow copy); the live values they need travel in "run".
            "config": tracking.redact_tree(cfg.to_dict()),
            # Runtime facts of this run, kept out of the config on purpose.
            "run": {"tracking_uri": uri, "mlflow_run_id": run_id, "counter": dataset_counter,
                    "spool_dir": spool_dir,
                    "run_dir": checkpoint_dir},
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo",
                                 timeout_s=_collective_timeout(cfg)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    finally:
        try:
            tracking.end_run(uri, run_id, status)
        except Exception as e:  # the server went down at the very end: training's result stands
            echo(f"MLflow: could not mark run {run_id} {status}: {tracking.redact(str(e))[:300]}")
    spool = os.path.join(spool_dir, f"{run_id}{tracking.SPOOL_SUFFIX}")
    if os.path.isfile(spool) and os.path.getsize(spool):
        echo(f"MLflow: some metrics were not delivered; replay them with: cola-ray replay-metrics {spool} "
             f"--tracking-uri {tracking.redact(uri)}")
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt and storage.is_s3(cfg.storage_path):
        ckpt = "s3://" + ckpt.lstrip("/")
    echo(f"Done: {name}, last checkpoint {ckpt}")
    return FitResult(name, run_dir, uri, run_id, ckpt, dict(result.metrics or {}), resumed)


def _check_resume_early(cfg: Config, run_dir: str) -> None:
    """Refuse, before Ray Train starts any worker, a resume that would change the number of
    negatives (the workers check it again on every restore). Names the checkpoint."""
    ends = (cfg.data.s3_endpoint_url, cfg.data.s3_region)
    newest = checkpoint_folders(run_dir, *ends)
    if not newest:
        return
    folder = newest[0][1]
    try:
        state = read_state_at(folder, *ends)
    except (CheckpointError, OSError):
        return  # not readable now: the workers restore what checks out and say what they skip
    try:
        check_resume(state, cfg, cfg.train.num_workers)
    except ValueError as e:
        raise ConfigError(f"cannot resume {folder}: {e}") from None


def _spool_dir(cfg: Config, name: str) -> str:
    """Where rank 0 spools MLflow records: ``tracking.spool_dir``, else beside the run's
    checkpoints when they are local, else under the home folder of rank 0's node."""
    if cfg.tracking.spool_dir:
        root = cfg.tracking.spool_dir
    elif storage.is_s3(cfg.storage_path):
        root = os.path.join(os.path.expanduser("~"), ".cache", "cola-ray", "mlflow-spool")
    else:
        return os.path.join(os.path.abspath(cfg.storage_path), name, "mlflow_spool")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), name)


def _collective_timeout(cfg: Config) -> int:
    """The process group's timeout: a rank stalled inside a collective fails its peers after
    twice the step watchdog (the data watchdog, which names the rank, fires first); Ray's
    default of 30 minutes without a watchdog."""
    return int(2 * cfg.train.step_timeout_s) if cfg.train.step_timeout_s > 0 else 1800


def _storage(cfg: Config) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path Ray Train writes the run to."""
    if storage.is_s3(cfg.storage_path):
        return storage.pyarrow_filesystem(cfg.storage_path, cfg.data.s3_endpoint_url, cfg.data.s3_region)
    root = os.path.abspath(cfg.storage_path)
    os.makedirs(root, exist_ok=True)
    return pafs.LocalFileSystem(), root


def _run_name(cfg: Config, fs: pafs.FileSystem, root: str) -> str:
    """The configured name; with ``resume`` and no name, the latest run that has checkpoints."""
    if cfg.name:
        return cfg.name
    if cfg.resume:
        runs = _runs_with_checkpoints(fs, root)
        if not runs:
            raise ConfigError(f"resume=true but no run with checkpoints under {cfg.storage_path!r}")
        return runs[-1]
    return time.strftime("cola-%Y%m%d-%H%M%S")


def _runs_with_checkpoints(fs: pafs.FileSystem, root: str) -> list[str]:
    """Run folders under ``root`` holding a checkpoint, oldest first by latest checkpoint."""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        ckpts = [c for c in fs.get_file_info(pafs.FileSelector(info.path))
                 if os.path.basename(c.path).startswith("checkpoint_")]
        if ckpts:
            newest = max((c.mtime.timestamp() if c.mtime else 0.0) for c in ckpts)
            found.append((newest, os.path.basename(info.path)))
    return [n for _, n in sorted(found)]


def _resolve_shards(cfg: Config, echo) -> Config:
    """``data.shards: synthetic`` builds the demo corpus once under the storage path."""
    if cfg.data.shards != SYNTHETIC:
        if not cfg.data.shards:
            raise ConfigError("data.shards is empty: give a folder or s3:// prefix of *.tar shards")
        return cfg
    import tempfile

    from cola_ray.data import shards, synthetic

    out = f"{cfg.storage_path.rstrip('/')}/_synthetic/shards"
    if not storage.is_s3(out):
        out = os.path.abspath(out)
    # build_shards returns at once when a complete build is there, and finishes a partial one.
    with tempfile.TemporaryDirectory(prefix="cola-synth-") as tmp:
        labels = synthetic.make_corpus(tmp, n_clips=128, seconds=3.0, seed=cfg.train.seed)
        echo(f"Synthetic corpus: shards at {out}")
        shards.build_shards(tmp, out, labels_csv=labels, max_samples=32, progress=False,
                            endpoint_url=cfg.data.s3_endpoint_url, region=cfg.data.s3_region)
    return replace(cfg, data=replace(cfg.data, shards=out))
