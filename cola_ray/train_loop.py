"""The training loop that runs on every Ray Train worker.

    loop_config = {"config": Config.to_dict(), "run": {tracking_uri, mlflow_run_id, counter}}

Each worker rebuilds the config, builds ColaModel (log-mel + encoder + head + W) under
DDP, restores the latest checkpoint if Ray Train hands one over, and steps through its
split of the streaming pair dataset. World rank 0 logs to MLflow every
``log_every_steps``; every ``checkpoint_every_steps`` all ranks call
``ray.train.report`` (a barrier: every rank must call it) and rank 0 attaches the
checkpoint. Stopping is by ``epochs`` or ``max_steps``, whichever comes first.

A resumed run restarts the interrupted epoch's pass over the data (Ray Data restarts a
streaming split from the beginning) but keeps the global step, so no step is repeated
in the logs beyond those after the last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from cola_ray import distributed
from cola_ray.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cola_ray.config import Config
from cola_ray.pipeline import check_budget
from cola_ray.tracking import RunLogger

MAX_CONSECUTIVE_NONFINITE = 20


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.from_dict(loop_config["config"])
    run = loop_config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # Ray gives each worker a CPU share; more threads than that only contend.
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)

    from cola_ray.model import ColaModel

    model = ColaModel(cfg.features, cfg.model)
    if on_gpu and cfg.model.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if on_gpu and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(core.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    state = TrainState(world_size=world, global_batch=cfg.train.batch_size,
                       mlflow_run_id=run["mlflow_run_id"], config=cfg.to_dict())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = load_checkpoint(folder, core, optimizer)
        _check_resume(restored, cfg, world)
        state.step, state.epoch = restored.step, restored.epoch

    logger = RunLogger(run["tracking_uri"], run["mlflow_run_id"]) if rank == 0 else None
    counter = run.get("counter")
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if use_bf16 else contextlib.nullcontext())

    local_batch = cfg.per_worker_batch
    shard = ray.train.get_dataset_shard("train")
    last_checkpoint_step = state.step
    nonfinite_run = 0
    window = _Window()
    done = cfg.train.max_steps > 0 and state.step >= cfg.train.max_steps

    while not done and state.epoch < cfg.train.epochs:
        steps_this_epoch = 0
        t_ready = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=local_batch,
            drop_last=True,  # every rank must take the same number of steps
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            dtypes=torch.float32,
            device=device,
        ):
            t_batch = time.perf_counter()
            anchor, positive = batch["anchor"], batch["positive"]  # (B_local, S) each
            with autocast:
                out = model(anchor, positive)
            loss = out["loss"]
            # All ranks must agree to skip a non-finite step, or DDP's all-reduce deadlocks.
            finite = distributed.all_reduce(torch.isfinite(loss.detach()).float(), op="min").item() > 0
            optimizer.zero_grad(set_to_none=True)
            if finite:
                loss.backward()
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
                optimizer.step()
                nonfinite_run = 0
            else:
                nonfinite_run += 1
                if nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                    raise FloatingPointError(
                        f"loss was not finite for {nonfinite_run} consecutive steps (last at step "
                        f"{state.step}); stopping"
                    )
            state.step += 1
            steps_this_epoch += 1
            t_done = time.perf_counter()
            window.add(loss.detach(), out["accuracy"].detach(), wait=t_batch - t_ready,
                       total=t_done - t_ready, skipped=not finite)

            if state.step % cfg.train.log_every_steps == 0:
                metrics = window.reduce(cfg.train.batch_size)
                metrics.update(lr=optimizer.param_groups[0]["lr"], epoch=state.epoch)
                if counter is not None:
                    snap = _snapshot(counter) if rank == 0 else None
                    if rank == 0 and snap is not None:
                        metrics.update(_sample_metrics(snap))
                    _fail_together(rank, snap, cfg, device)
                if logger is not None:
                    logger.log_metrics(metrics, step=state.step)
            done = cfg.train.max_steps > 0 and state.step >= cfg.train.max_steps
            if state.step % cfg.train.checkpoint_every_steps == 0 or done:
                _report(state, core, optimizer, logger, cfg, rank)
                last_checkpoint_step = state.step
            if done:
                break
            t_ready = time.perf_counter()
        if steps_this_epoch == 0:
            raise RuntimeError(
                f"epoch {state.epoch} gave worker {rank} no full batch of {local_batch} pairs: the "
                f"shards at {cfg.data.shards!r} hold too few clips for train.batch_size="
                f"{cfg.train.batch_size} over {world} workers"
            )
        if not done:
            state.epoch += 1
    if window.steps:  # steps since the last log line (the same count on every rank)
        metrics = window.reduce(cfg.train.batch_size)
        if logger is not None:
            logger.log_metrics(metrics, step=state.step)
    if state.step != last_checkpoint_step:
        _report(state, core, optimizer, logger, cfg, rank)

    if rank == 0 and logger is not None and cfg.tracking.log_model:
        # Batch of 2: MLflow exports (torch.export, no pickle) with a dynamic batch dimension.
        example = torch.zeros(2, cfg.data.segment_samples).numpy()
        uri = logger.log_encoder(core.encoder, example, cfg.tracking.registered_model_name)
        logger.set_tags({"cola_ray.encoder_uri": uri})


def _report(state: TrainState, core: torch.nn.Module, optimizer: torch.optim.Optimizer,
            logger: RunLogger | None, cfg: Config, rank: int) -> None:
    """Checkpoint (rank 0 writes, every rank reports) and copy it to MLflow."""
    metrics = {"step": state.step, "epoch": state.epoch}
    name = f"checkpoint_{state.step:09d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="cola-ckpt-") as tmp:
        save_checkpoint(tmp, core, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)
        if logger is not None and cfg.tracking.log_checkpoints:
            logger.log_artifacts(tmp, f"checkpoints/{name}")


def _check_resume(restored: TrainState, cfg: Config, world: int) -> None:
    """The number of negatives is the global batch: a resume must not change it silently."""
    if restored.global_batch and restored.global_batch != cfg.train.batch_size:
        raise ValueError(
            f"checkpoint at step {restored.step} was trained with global batch "
            f"{restored.global_batch}; this run asks for train.batch_size={cfg.train.batch_size}. "
            "The global batch sets the number of negatives: keep it, and change train.num_workers "
            "(the per-worker batch follows) if you need a different world size"
        )


def _snapshot(counter: Any) -> dict[str, Any] | None:
    """The bad-sample tallies, or None if their actor is gone (its node died): training goes
    on without counts rather than failing for want of a statistic."""
    try:
        return ray.get(counter.snapshot.remote(), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        logging.getLogger(__name__).warning("bad-sample counter unavailable, not counting: %s", e)
        return None


def _sample_metrics(snap: dict[str, Any]) -> dict[str, float]:
    bad = snap["bad"]
    out = {"data/good_samples": float(snap["good"]), "data/bad_samples": float(sum(bad.values()))}
    out.update({f"data/bad_{reason}": float(n) for reason, n in bad.items()})
    return out


def _fail_together(rank: int, snap: dict[str, Any] | None, cfg: Config, device: torch.device) -> None:
    """Rank 0 judges the error budget; every rank raises together so none is left waiting."""
    message = ""
    if rank == 0 and snap is not None:
        try:
            check_budget(snap, cfg.data)
        except RuntimeError as e:
            message = str(e)
    over = distributed.all_reduce(torch.tensor(float(bool(message)), device=device), op="max").item() > 0
    if over:
        from cola_ray.pipeline import ErrorBudgetExceeded

        raise ErrorBudgetExceeded(message or "error budget exceeded (see rank 0's error)")


class _Window:
    """Accumulates step metrics between two logging steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.accs: list[torch.Tensor] = []
        self.wait = self.total = 0.0
        self.skipped = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, acc: torch.Tensor, *, wait: float, total: float, skipped: bool) -> None:
        if not skipped:
            self.losses.append(loss.float())
            self.accs.append(acc.float())
        self.wait += wait
        self.total += total
        self.skipped += int(skipped)

    @property
    def steps(self) -> int:
        return len(self.losses) + self.skipped

    def reduce(self, global_batch: int) -> dict[str, float]:
        """Mean over the window and over ranks (one all-reduce)."""
        n = self.steps
        device = self.losses[0].device if self.losses else torch.device("cpu")
        local = torch.stack([
            torch.stack(self.losses).mean() if self.losses else torch.tensor(math.nan, device=device),
            torch.stack(self.accs).mean() if self.accs else torch.tensor(math.nan, device=device),
            torch.tensor(self.wait / max(self.total, 1e-9), device=device),
        ]).float()
        world = distributed.world_size()
        mean = distributed.all_reduce(local, op="sum") / world
        out = {
            "loss": mean[0].item(),
            "contrastive_accuracy": mean[1].item(),
            "data_wait_fraction": mean[2].item(),
            # Wall time since the last log line: logging and checkpoints count too.
            "pairs_per_second": n * global_batch / max(time.perf_counter() - self.started, 1e-9),
            "skipped_steps": float(self.skipped),
        }
        self.reset()
        return out
