"""The training loop that runs on every Ray Train worker.

    loop_config = {"config": Config.to_dict(), "run": {tracking_uri, mlflow_run_id, counter}}

Each worker rebuilds the config, builds ColaModel (log-mel + encoder + head + W) under
DDP, restores the latest checkpoint if Ray Train hands one over, and steps through its
split of the streaming pair dataset. World rank 0 logs to MLflow every
``log_every_steps``; every ``checkpoint_every_steps`` all ranks call
``ray.train.report`` (a barrier: every rank must call it) and rank 0 attaches the
checkpoint. Stopping is by ``epochs`` or ``max_steps``, whichever comes first.

A resumed run restarts the interrupted epoch's pass over the data (Ray Data restarts a
streaming split from the beginning) but keeps the global step. Rank 0 logs through a
local spool drained by a background thread (:class:`cola_ray.train.tracking.SpooledLogger`): a
slow or dead MLflow server never blocks a step, and the steps re-trained after a restore
are not logged twice. A rank that waits longer than ``train.step_timeout_s`` for its
next batch raises :class:`StallError` naming itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator

import ray.train
import ray.train.torch
import torch

from cola_ray.model import distributed
from cola_ray.data import storage
from cola_ray.train.checkpoint import (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CheckpointError, TrainState,
                                 checkpoint_folders, load_checkpoint, read_state, save_checkpoint)
from cola_ray.config import Config
from cola_ray.data.pipeline import check_budget, collision_rate
from cola_ray.train.tracking import SpooledLogger, redact

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 20


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` under ``torch.compile`` per ``train.compile`` (``""``: ``model`` itself).

    The DDP-wrapped model is compiled (DDP's optimizer splits the graph at gradient
    buckets, so communication still overlaps). ``eager`` traces without generating code:
    a cheap check that the model compiles, no speed-up. Batches have one shape
    (``drop_last``), so there is one compilation per run.
    """
    if not mode:
        return model
    if mode == "eager":
        return torch.compile(model, backend="eager")
    return torch.compile(model, mode=mode)


class StallError(TimeoutError):
    """A rank got no batch from its data stream within ``train.step_timeout_s``."""


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

    from cola_ray.model.cola import ColaModel

    model = ColaModel(cfg.features, cfg.model)
    if on_gpu and cfg.model.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if on_gpu and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    # The step calls `forward`; checkpoints and the optimiser use `core` (plain parameter names).
    forward = compiled(model, cfg.train.compile)
    optimizer = torch.optim.Adam(core.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    state = TrainState(world_size=world, global_batch=cfg.train.batch_size,
                       mlflow_run_id=run["mlflow_run_id"], config=cfg.to_dict())
    checkpoint = ray.train.get_checkpoint()
    restored = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = load_checkpoint(folder, core, optimizer)
    ray_step = restored.step if restored else 0
    if run.get("run_dir"):  # a newer checkpoint Ray had not registered when a worker died
        restored = _load_newer(run["run_dir"], cfg, core, optimizer, run["mlflow_run_id"], ray_step) or restored
    if restored is not None:
        check_resume(restored, cfg, world)
        state.step, state.epoch = restored.step, restored.epoch
    # Every rank must start from the same step (they read the same folders; check it).
    steps = torch.tensor([float(state.step), -float(state.step)], device=device)
    if distributed.all_reduce(steps.clone(), op="max").tolist() != steps.tolist():
        raise RuntimeError(f"rank {rank} restored step {state.step}, another rank a different one")

    # Rank 0 logs through a local spool drained by a thread: MLflow being slow or down never
    # blocks a step, and steps already in the run (re-trained after a restore) are not re-logged.
    logger = SpooledLogger(run["tracking_uri"], run["mlflow_run_id"], run["spool_dir"]) if rank == 0 else None
    if logger is not None and restored is not None:
        logger.set_tags({"cola_ray.restored_from_step": state.step, "cola_ray.ray_checkpoint_step": ray_step,
                         "cola_ray.restored_world_size": world,
                         "cola_ray.restored_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    counter = run.get("counter")
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if use_bf16 else contextlib.nullcontext())

    local_batch = cfg.per_worker_batch
    shard = ray.train.get_dataset_shard("train")
    last_checkpoint_step = state.step
    nonfinite_run = 0
    window = _Window()
    collisions: list[float] = []  # same-clip pair rate of each local batch in the window
    quarantined: dict[str, str] = {}  # shard -> why, as last tagged on the MLflow run
    done = cfg.train.max_steps > 0 and state.step >= cfg.train.max_steps

    while not done and state.epoch < cfg.train.epochs:
        steps_this_epoch = 0
        t_ready = time.perf_counter()
        batches = shard.iter_torch_batches(
            batch_size=local_batch,
            drop_last=True,  # every rank must take the same number of steps
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            dtypes=torch.float32,
            device=device,
            prefetch_batches=cfg.train.prefetch_batches,
            pin_memory=on_gpu and cfg.train.pin_memory,
        )
        for batch in _watched(batches, cfg.train.step_timeout_s, rank, world, state):
            t_batch = time.perf_counter()
            anchor, positive = batch["anchor"], batch["positive"]  # (B_local, S) each
            if "clip_id" in batch:
                collisions.append(collision_rate(batch["clip_id"]))
            with autocast:
                # Clip ids (B_local,): crops of an anchor's own clip are masked from its negatives.
                out = forward(anchor, positive, batch.get("clip_id"))
            loss = out["loss"]
            finite = optimizer_step(loss, optimizer, core, cfg.train.grad_clip)
            if finite:
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
                if collisions:  # this rank's local batches (rank 0 logs)
                    metrics["data/collision_rate"] = sum(collisions) / len(collisions)
                    collisions.clear()
                if counter is not None:
                    snap = _snapshot(counter) if rank == 0 else None
                    if rank == 0 and snap is not None:
                        metrics.update(_sample_metrics(snap))
                        if logger is not None and snap.get("bad_shards", {}) != quarantined:
                            quarantined = dict(snap["bad_shards"])  # named in the run, not only counted
                            logger.set_tags({"cola_ray.quarantined_shards": "; ".join(
                                f"{k}: {v}" for k, v in sorted(quarantined.items()))[:5000]})
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

    if logger is None:
        return
    left = logger.close(timeout=cfg.tracking.flush_timeout_s)
    if left:
        # Training is done and checkpointed; only the tracking copy is behind.
        log.warning("MLflow %s did not take %d record(s) within %.0fs; they are in %s. Deliver them with: "
                    "cola-ray replay-metrics %s --tracking-uri <uri>", redact(logger.uri), left,
                    cfg.tracking.flush_timeout_s, logger.spool, logger.spool)
        return  # the encoder is in the final checkpoint (cola-ray export) rather than in MLflow
    if cfg.tracking.log_model:
        # Batch of 2: MLflow exports (torch.export, no pickle) with a dynamic batch dimension.
        example = torch.zeros(2, cfg.data.segment_samples).numpy()
        uri = logger.client.log_encoder(core.encoder, example, cfg.tracking.registered_model_name)
        logger.client.set_tags({"cola_ray.encoder_uri": uri})


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, core: torch.nn.Module,
                   grad_clip: float) -> bool:
    """Backward and step, unless the loss is non-finite on ANY rank: then every rank skips
    together (one rank skipping alone would leave its peers in DDP's all-reduce forever).
    Returns whether the step was taken."""
    finite = distributed.all_reduce(torch.isfinite(loss.detach()).float(), op="min").item() > 0
    optimizer.zero_grad(set_to_none=True)
    if finite:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
        optimizer.step()
    return finite


def _report(state: TrainState, core: torch.nn.Module, optimizer: torch.optim.Optimizer,
            logger: SpooledLogger | None, cfg: Config, rank: int) -> None:
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


def _load_newer(run_dir: str, cfg: Config, core: torch.nn.Module, optimizer: torch.optim.Optimizer,
                mlflow_run_id: str, after_step: int) -> TrainState | None:
    """Load the newest complete checkpoint of this run newer than ``after_step``, if any.

    Ray Train restores the checkpoint its controller has registered, and it registers a
    report only when it next polls the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s,
    later under load): a worker killed in that window resumes a checkpoint older than the
    one already uploaded (measured: 16-17 steps redone with checkpoints every 10). The
    uploaded folder is in ``run_dir``; it is used only if it belongs to this MLflow run and
    every file checks out against its state.json (a partial upload is refused, untouched).
    """
    ends = (cfg.data.s3_endpoint_url, cfg.data.s3_region)
    for step, folder in checkpoint_folders(run_dir, *ends):
        if step <= after_step:
            break
        with tempfile.TemporaryDirectory(prefix="cola-restore-") as tmp:
            try:
                local = folder
                if storage.is_s3(folder):
                    for name in (STATE_FILE, MODEL_FILE, OPTIMIZER_FILE):
                        with open(f"{tmp}/{name}", "wb") as f:
                            f.write(storage.read_bytes(f"{folder}/{name}", *ends))
                    local = tmp
                if read_state(local).mlflow_run_id != mlflow_run_id:
                    continue
                restored = load_checkpoint(local, core, optimizer)
            except (CheckpointError, OSError) as e:  # incomplete: the upload was cut by the failure
                log.warning("not resuming from %s: %s", folder, e)
                continue
        log.warning("resuming from %s, newer than the checkpoint Ray Train registered (step %d)",
                    folder, after_step)
        return restored
    return None


def check_resume(restored: TrainState, cfg: Config, world: int) -> None:
    """The number of negatives is the global batch (gathered) or the per-worker batch (not
    gathered): a resume must not change it silently. Another world size is fine when
    negatives are gathered: the per-worker batch follows, the objective stays."""
    if restored.global_batch and restored.global_batch != cfg.train.batch_size:
        raise ValueError(
            f"checkpoint at step {restored.step} was trained with global batch "
            f"{restored.global_batch}; this run asks for train.batch_size={cfg.train.batch_size}. "
            "The global batch sets the number of negatives: keep it, and change train.num_workers "
            "(the per-worker batch follows) if you need a different world size"
        )
    was_gathered = restored.config.get("model", {}).get("gather_negatives", True)
    before = restored.global_batch // max(1, restored.world_size) if not was_gathered else restored.global_batch
    now = cfg.per_worker_batch if not cfg.model.gather_negatives else cfg.train.batch_size
    if restored.global_batch and before != now:
        raise ValueError(
            f"checkpoint at step {restored.step} was trained with {before} pairs per softmax "
            f"({restored.world_size} workers, model.gather_negatives={was_gathered}); this run would use "
            f"{now} ({world} workers, model.gather_negatives={cfg.model.gather_negatives}). The number "
            "of negatives is the objective: resume with the same world size, or gather negatives"
        )


def _watched(batches: Iterable[dict[str, torch.Tensor]], timeout_s: float, rank: int, world: int,
             state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """``batches``, pulled by a helper thread; a rank that waits more than ``timeout_s`` for
    its next batch raises :class:`StallError` naming itself, so Ray Train fails (or
    restarts) the group now instead of its peers waiting out a 30-minute barrier.

    Only the wait for data is timed; a peer that stalls inside a collective is caught by
    the process group's own timeout (set from the same field in trainer.py).
    """
    if timeout_s <= 0:
        yield from batches
        return
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for batch in batches:
                if not put(("batch", batch)):
                    return
            put(("end", None))
        except BaseException as e:  # surfaces in the training thread below
            put(("error", e))

    threading.Thread(target=pump, daemon=True, name=f"cola-ray-data-rank{rank}").start()
    try:
        while True:
            t0 = time.monotonic()
            try:
                kind, item = handoff.get(timeout=timeout_s)
            except queue.Empty:
                raise StallError(
                    f"rank {rank} of {world}: no batch from its data stream for "
                    f"{time.monotonic() - t0:.0f}s (train.step_timeout_s={timeout_s:g}) after step "
                    f"{state.step}, epoch {state.epoch}; the data pipeline is stalled (a shard read that "
                    "never returns, a dead storage mount?)"
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


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
    out.update({f"data/refused_{kind}": float(n) for kind, n in snap.get("refused", {}).items()})
    out["data/quarantined_shards"] = float(len(snap.get("bad_shards", {})))
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
        from cola_ray.data.pipeline import ErrorBudgetExceeded

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
