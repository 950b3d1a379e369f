"""fit(cfg): the driver side of pre-training.

:func:`cola_ray.train.preflight.preflight` checks the config, the services and the storage
and connects to Ray; ``fit`` then builds the streaming pair dataset, opens the MLflow run,
and hands both to a ``TorchTrainer`` whose workers run
:func:`cola_ray.train.loop.train_loop_per_worker`. A run lives in ``<storage_path>/<name>``
(local or s3://, :class:`cola_ray.train.paths.RunPaths`); starting a run with the name of
one that has checkpoints there resumes it (Ray Train restores the latest checkpoint, and
the MLflow run with that name continues).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from cola_ray import console
from cola_ray.config import Config
from cola_ray.data.pipeline import EpochLedger, SampleCounter, read_pairs
from cola_ray.train import cluster, progress, tracking
from cola_ray.train.loop import train_loop_per_worker
from cola_ray.train.preflight import RunPlan, preflight

log = logging.getLogger(__name__)


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
    # Bad input fails here, within seconds and naming the thing, before any worker starts.
    plan = preflight(cfg, echo)
    cfg, paths = plan.cfg, plan.paths
    # Per-epoch progress bars of the streaming split drown the log; MLflow has the progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # On the driver's node: the run's tallies must outlive the loss of any worker node.
    dataset_counter = SampleCounter.options(**cluster.on_driver_node()).remote()
    # Each epoch's crops (from train.seed) and what a resumed epoch must leave out: set by
    # world rank 0, read by every decode task.
    ledger = EpochLedger.options(**cluster.on_driver_node()).remote(seed=cfg.train.seed)
    datasets = {"train": read_pairs(cfg.data, dataset_counter, plan.urls, ledger)}

    uri, run_id, resumed = tracking.start_or_resume_run(cfg, paths.name, tags={"cola_ray.run_dir": paths.run_dir})
    echo(f"MLflow: {tracking.run_url(uri, run_id, cfg.tracking.experiment)}")
    echo(f"Checkpoints: {paths.run_dir}" + ("  (resuming)" if resumed else ""))
    status = "FAILED"
    try:
        # Rank 0's figures (and the online evaluation's) on this console while the run goes on.
        with progress.shown(plain_every_s=cfg.train.progress_every_s,
                            time_budget_s=cfg.train.max_minutes * 60) as board:
            run = {"tracking_uri": uri, "mlflow_run_id": run_id, "counter": dataset_counter, "progress": board,
                   "ledger": ledger, "shard_names": [os.path.basename(u) for u in plan.urls],
                   "shard_versions": plan.shard_versions, **paths.worker_fields()}
            result = _torch_trainer(plan, run, datasets).fit()
        status = "FINISHED"
    finally:
        try:
            tracking.end_run(uri, run_id, status)
        except Exception as e:  # the server went down at the very end: training's result stands
            echo(f"MLflow: could not mark run {run_id} {status}: {tracking.redact(str(e))[:300]}")
    spool = os.path.join(paths.spool_dir, f"{run_id}{tracking.SPOOL_SUFFIX}")
    if os.path.isfile(spool) and os.path.getsize(spool):
        echo(f"MLflow: some metrics were not delivered; replay them with: cola-ray replay-metrics {spool} "
             f"--tracking-uri {tracking.redact(uri)}")
    ckpt = paths.checkpoint_url(result.checkpoint.path) if result.checkpoint is not None else None
    echo(f"Done: {paths.name}, last checkpoint {ckpt}")
    return FitResult(paths.name, paths.run_dir, uri, run_id, ckpt, dict(result.metrics or {}), resumed)


def _torch_trainer(plan: RunPlan, run: dict[str, Any], datasets: dict[str, Any]) -> TorchTrainer:
    """The TorchTrainer of ``plan``; ``run`` is what the workers get as ``loop_config["run"]``."""
    cfg, paths = plan.cfg, plan.paths
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.resources_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            # Credentials in URLs are masked: the workers' copy ends up in every checkpoint's
            # state.json (and its MLflow copy); the live values they need travel in "run".
            "config": tracking.redact_tree(cfg.to_dict()),
            # Runtime facts of this run, kept out of the config on purpose.
            "run": run,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo",
                                 timeout_s=_collective_timeout(cfg)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=paths.name,
            storage_path=paths.root,
            storage_filesystem=paths.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=console.train_logging_config(),
        ),
        datasets=datasets,
        validation_config=_validation_config(cfg, run),
    )


def _validation_config(cfg: Config, run: dict[str, Any]) -> ray.train.ValidationConfig | None:
    """With ``eval.mode=async``: Ray Train runs online evaluation on the checkpoints the
    workers report with ``validation=`` (:meth:`cola_ray.train.loop.Checkpointer.save`), as
    Ray tasks on ``eval.num_cpus`` / ``eval.num_gpus``, one at a time, while training goes on."""
    if not cfg.eval.every_steps or cfg.eval.mode != "async":
        return None
    from cola_ray.train.online_eval import validate_checkpoint

    return ray.train.ValidationConfig(
        fn=validate_checkpoint,
        task_config=ray.train.ValidationTaskConfig(
            # Only the per-report kwargs ({"step"}) are saved in the run's state; these stay in memory.
            fn_kwargs={"config": tracking.redact_tree(cfg.to_dict()),
                       "run": {"tracking_uri": run["tracking_uri"], "mlflow_run_id": run["mlflow_run_id"],
                    "progress": run.get("progress")}},
            timeout_s=cfg.eval.timeout_s or None),
        # No retries: a failed evaluation is counted, and the next checkpoint's comes soon.
        ray_remote_kwargs={"num_cpus": cfg.eval.num_cpus, "num_gpus": cfg.eval.num_gpus, "max_retries": 0},
    )


def _collective_timeout(cfg: Config) -> int:
    """The process group's timeout: a rank stalled inside a collective fails its peers after
    twice the step watchdog (the data watchdog, which names the rank, fires first); Ray's
    default of 30 minutes without a watchdog."""
    return int(2 * cfg.train.step_timeout_s) if cfg.train.step_timeout_s > 0 else 1800
