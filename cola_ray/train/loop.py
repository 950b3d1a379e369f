"""The training loop that runs on every Ray Train worker, in four phases::

    loop_config = {"config": Config.to_dict(),
                   "run": {tracking_uri, mlflow_run_id, counter, checkpoint_dir, spool_dir}}

    set up      config rebuilt, device, ColaModel (log-mel + encoder + head + W) under DDP,
                torch.compile, Adam, bf16 autocast                          :func:`set_up`
    restore     Ray Train's checkpoint, or a newer complete one of this run   :func:`restore`
    each batch  step (skipped on every rank if any loss is not finite)       :class:`Stepper`
                log every ``log_every_steps`` (world rank 0 writes MLflow)    :class:`StepLogger`
                evaluate every ``eval.every_steps`` (async: a Ray Train validation task on the checkpoint;
                  inline: rank 0)                                             :mod:`cola_ray.train.online_eval`
                checkpoint every ``checkpoint_every_steps`` (``ray.train.report``, a barrier:
                every rank calls it; rank 0 attaches the checkpoint)          :class:`Checkpointer`
    finish      the last window and checkpoint, the MLflow spool flushed, the encoder logged

Stopping is by ``epochs``, ``max_steps`` or ``max_minutes`` (checked at log steps),
whichever comes first. A resumed run restarts
the interrupted epoch's pass over the data (Ray Data restarts a streaming split from the
beginning) but keeps the global step. Rank 0 logs through a local spool drained by a
background thread (:class:`cola_ray.train.tracking.SpooledLogger`): a slow or dead MLflow
server never blocks a step, and the steps re-trained after a restore are not logged twice.
A rank that waits longer than ``train.step_timeout_s`` for its next batch raises
:class:`StallError` naming itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable, Iterator, Mapping

import numpy as np
import ray.train
import ray.train.torch
import torch

from cola_ray.config import Config
from cola_ray.data import storage
from cola_ray.data.pipeline import batch_dtypes, check_budget, collision_rate, model_input
from cola_ray.model import distributed
from cola_ray.train import online_eval, progress
from cola_ray.train.epochs import EpochClips, restored_record, resume_skip
from cola_ray.train.checkpoint import (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CheckpointError, TrainState,
                                       check_resume, checkpoint_folders, load_checkpoint, read_state,
                                       save_checkpoint)
from cola_ray.train.tracking import SpooledLogger, redact, start_system_metrics, stop_system_metrics

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 20
"""Consecutive skipped (non-finite) steps after which training stops."""


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
    """One Ray Train worker: set up, restore, then step / log / checkpoint every batch; finish."""
    run = loop_config["run"]
    w = set_up(loop_config["config"])
    cfg = w.cfg
    state, resumed, skip, record = restore(w, run)
    clips = EpochClips(run.get("shard_names", []), cfg.data.pairs_per_clip)  # exactly-once epochs
    stepper = Stepper(w)
    logger = StepLogger(w, run, resumed)
    ctx = ray.train.get_context()  # one monitor per node (local rank 0): system/node_<rank>/...
    system = start_system_metrics(run["tracking_uri"], run["mlflow_run_id"], cfg,
                                  node_rank=ctx.get_node_rank(), local_rank=ctx.get_local_rank())
    checkpointer = Checkpointer(w, logger.spool, state.step, clips, run.get("counter"))
    clock = Clock(w, state)
    evaluator = _evaluator(w)  # world rank 0 only, with eval.every_steps and eval.mode=inline
    done = ((cfg.train.max_steps > 0 and state.step >= cfg.train.max_steps)
            or 0 < cfg.train.max_minutes * 60 <= state.train_seconds)  # restored: the same on every rank

    while not done and state.epoch < cfg.train.epochs:
        # Begin: the epoch's pass leaves out what a restored checkpoint had trained on in it.
        begin_epoch(w, run.get("ledger"), clips, state.epoch, skip, record)
        resuming, skip, record = bool(skip), {}, {}
        steps_this_epoch = 0
        t_ready = time.perf_counter()
        for batch in _watched(w.epoch_batches(), cfg.train.step_timeout_s, w.rank, w.world, state):
            t_batch = time.perf_counter()
            # Step: forward, backward, update; every rank skips together on a non-finite loss.
            out, finite = stepper.step(batch, state.step)
            clips.add(batch["shard_idx"], batch["sample_idx"])
            state.step += 1
            steps_this_epoch += 1
            logger.add(batch, out, finite, wait=t_batch - t_ready, total=time.perf_counter() - t_ready)
            state.train_seconds = clock.seconds()
            done = cfg.train.max_steps > 0 and state.step >= cfg.train.max_steps
            # Log: the window's means over ranks, and the time limit (collectives: every rank calls them).
            if state.step % cfg.train.log_every_steps == 0:
                logger.log(state, lr=w.optimizer.param_groups[0]["lr"])
                done = clock.out_of_time() or done
            # Evaluate: inline, rank 0 probes eval.tasks now (the others wait at their next
            # collective); async, this step's checkpoint goes to Ray Train's validation task.
            evaluate = online_eval.due(cfg, state.step)
            if evaluate and evaluator is not None:
                logger.log_eval(evaluator.run_safely(w.core.encoder), state.step)
            validate = evaluate and cfg.eval.mode == "async"
            # Checkpoint: every checkpoint_every_steps, at the last step, and to be evaluated.
            if state.step % cfg.train.checkpoint_every_steps == 0 or done or validate:
                checkpointer.save(state, validate=validate)
            if done:
                break
            t_ready = time.perf_counter()
        if steps_this_epoch == 0 and not resuming:  # (a resumed epoch may have had less than a batch left)
            raise RuntimeError(
                f"epoch {state.epoch} gave worker {w.rank} no full batch of {cfg.per_worker_batch} pairs: "
                f"the shards at {cfg.data.shards!r} hold too few clips for train.batch_size="
                f"{cfg.train.batch_size} over {w.world} workers"
            )
        if not done:  # the epoch's clips, each once (collective: every rank)
            logger.log_epoch(clips.epoch_metrics(), state)
            state.epoch += 1
            clips.begin()  # a checkpoint from here on is of the new epoch, which has trained on nothing yet

    # Finish: the steps since the last log line, a checkpoint of the last step, MLflow
    # flushed, and the encoder logged once everything else is in the run.
    logger.log_rest(state)
    checkpointer.save_if_behind(state)
    stop_system_metrics(system)  # its last records reach MLflow before the run is closed
    if logger.flush():
        logger.log_model(w.core)


# ---- set up -------------------------------------------------------------------------

@dataclass
class Setup:
    """What this worker builds once and every phase reads: the config, its place in the
    group, its device, the model, the optimiser, the autocast context and its data split."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    core: torch.nn.Module
    """The plain ColaModel: checkpoints, the optimiser, clipping and the logged encoder use it
    (plain parameter names)."""
    forward: torch.nn.Module
    """The DDP-wrapped model under ``torch.compile`` (``train.compile``): what the step calls."""
    optimizer: torch.optim.Optimizer
    autocast: ContextManager[Any]
    """bf16 autocast (``train.precision`` bf16, or auto on a GPU), else a null context."""
    shard: Any
    """This worker's split of the ``train`` dataset (a Ray Data ``DataIterator``)."""

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def epoch_batches(self) -> Iterable[dict[str, torch.Tensor]]:
        """One pass over this worker's split: ``{"anchor", "positive": (B_local, S), "clip_id"}``
        (+ ``"step", "gain"`` with int16 pairs; :func:`model_input` makes them float32 here)."""
        return self.shard.iter_torch_batches(
            batch_size=self.cfg.per_worker_batch,
            drop_last=True,  # every rank must take the same number of steps
            local_shuffle_buffer_size=self.cfg.data.shuffle_buffer or None,
            dtypes=batch_dtypes(self.cfg.data),
            device=self.device,
            prefetch_batches=self.cfg.train.prefetch_batches,
            pin_memory=self.on_gpu and self.cfg.train.pin_memory,
        )


def set_up(config: Mapping[str, Any]) -> Setup:
    """Rebuild the config; build the model (the same init on every rank), DDP, compile, Adam."""
    cfg = Config.from_dict(config)
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
    forward = compiled(model, cfg.train.compile)
    optimizer = make_optimizer(core, cfg)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if use_bf16 else contextlib.nullcontext())
    return Setup(cfg, rank, world, device, core, forward, optimizer, autocast, ray.train.get_dataset_shard("train"))


def make_optimizer(core: torch.nn.Module, cfg: Config) -> torch.optim.Adam:
    """Adam over ``core``; with ``train.bilinear_lr`` a second group holds W and the logit
    scale at that rate. The schedule (:func:`lr_factor`) scales the configured rates every step."""
    t = cfg.train
    similarity = list(core.similarity_parameters()) if t.bilinear_lr and hasattr(core, "similarity_parameters") else []
    ids = {id(p) for p in similarity}
    groups = [{"params": [p for p in core.parameters() if id(p) not in ids], "lr": t.lr}]
    if similarity:  # one group otherwise: the optimiser state of older checkpoints still loads
        groups.append({"params": similarity, "lr": t.bilinear_lr})
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(cfg: Config, step: int) -> float:
    """The schedule's multiplier of every group's ``base_lr`` at ``step`` (0-based): a linear
    warm-up over ``train.warmup_steps``, then constant or a cosine to 0 at ``max_steps``."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_decay == "cosine":
        span = max(1, t.max_steps - t.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
    return 1.0


class Clock:
    """Training time across resumes, for ``train.max_minutes``: rank 0's clock decides at a
    log step, and every rank learns it in one all-reduce, so all stop at the same step."""

    def __init__(self, w: "Setup", state: TrainState) -> None:
        self.w = w
        self.before = state.train_seconds
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.started

    def out_of_time(self) -> bool:
        """Whether ``train.max_minutes`` has passed (a collective when it is set: every rank calls it)."""
        limit = self.w.cfg.train.max_minutes * 60.0
        if not limit:
            return False
        over = float(self.w.rank == 0 and self.seconds() >= limit)
        return distributed.all_reduce(torch.tensor(over, device=self.w.device), op="max").item() > 0


def _evaluator(w: "Setup") -> Any:
    """:class:`cola_ray.train.online_eval.OnlineEval` on world rank 0 with ``eval.every_steps``
    and ``eval.mode=inline`` (async evaluation runs in Ray Train's validation tasks)."""
    if w.rank != 0 or not w.cfg.eval.every_steps or w.cfg.eval.mode != "inline":
        return None
    return online_eval.OnlineEval(w.cfg, w.device)


# ---- restore --------------------------------------------------------------------------

@dataclass(frozen=True)
class Resumed:
    """Where a restored worker group starts: the step restored, and the step of the
    checkpoint Ray Train handed over (lower when :func:`_load_newer` found a newer one)."""

    step: int
    ray_step: int


def restore(w: Setup, run: Mapping[str, Any]) -> tuple[TrainState, Resumed | None, dict[str, np.ndarray],
                                                      dict[str, np.ndarray]]:
    """The train state to start from, with ``w.core`` and ``w.optimizer`` loaded; ``None``
    for a fresh start; the clips the restored epoch must not deliver again, per shard
    (:func:`cola_ray.train.epochs.resume_skip`; {} for a fresh start or a fresh epoch); and
    what its record starts from (the same, or with ``data.resume_epoch=restart`` all the
    checkpoint had, so clips delivered twice are counted).

    Ray Train's checkpoint, unless the run's folder holds a newer complete one of this
    MLflow run (:func:`_load_newer`); refused by :func:`check_resume` if it would change
    the number of negatives. Every rank must start from the same step (one all-reduce).
    """
    cfg = w.cfg
    state = TrainState(world_size=w.world, global_batch=cfg.train.batch_size,
                       mlflow_run_id=run["mlflow_run_id"], config=cfg.to_dict(),
                       data_shards=dict(run.get("shard_versions") or {}))
    checkpoint = ray.train.get_checkpoint()
    restored = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = load_checkpoint(folder, w.core, w.optimizer)
    ray_step = restored.step if restored else 0
    if run.get("checkpoint_dir"):  # a newer checkpoint Ray had not registered when a worker died
        restored = _load_newer(run["checkpoint_dir"], cfg, w.core, w.optimizer, run["mlflow_run_id"],
                               ray_step) or restored
    skip: dict[str, np.ndarray] = {}
    record: dict[str, np.ndarray] = {}
    if restored is not None:
        check_resume(restored, cfg, w.world)
        state.step, state.epoch, state.train_seconds = restored.step, restored.epoch, restored.train_seconds
        state.quarantine = dict(restored.quarantine)
        if w.rank == 0 and restored.quarantine and run.get("counter") is not None:
            # Before the all-reduce below, so no rank reads data before the quarantine is back.
            ray.get(run["counter"].restore.remote(restored.quarantine), timeout=60)
        if "shard_versions" in run:
            skip = resume_skip(restored.epoch_clips, restored.data_shards, run["shard_versions"],
                               cfg.data.resume_epoch, f"the checkpoint of step {restored.step}")
            record = skip if cfg.data.resume_epoch == "continue" else restored_record(restored.epoch_clips)
    # Every rank must start from the same step (they read the same folders; check it).
    steps = torch.tensor([float(state.step), -float(state.step)], device=w.device)
    if distributed.all_reduce(steps.clone(), op="max").tolist() != steps.tolist():
        raise RuntimeError(f"rank {w.rank} restored step {state.step}, another rank a different one")
    return state, (Resumed(state.step, ray_step) if restored is not None else None), skip, record


def begin_epoch(w: Setup, ledger: Any, clips: EpochClips, epoch: int, skip: Mapping[str, np.ndarray],
                record: Mapping[str, np.ndarray]) -> None:
    """Rank 0 tells the data ledger what this epoch must leave out (``skip``, from a
    restore; {} for a fresh epoch); every rank waits for it before the pass starts, and
    starts its record of the epoch from ``record``."""
    if ledger is not None and w.rank == 0:
        ray.get(ledger.begin.remote(epoch, dict(skip)))
    if ledger is not None:
        distributed.all_reduce(torch.zeros(1, device=w.device))  # a barrier: the ledger is set
    clips.begin(record)


def _load_newer(checkpoint_dir: str, cfg: Config, core: torch.nn.Module, optimizer: torch.optim.Optimizer,
                mlflow_run_id: str, after_step: int) -> TrainState | None:
    """Load the newest complete checkpoint of this run newer than ``after_step``, if any.

    Ray Train restores the checkpoint its controller has registered, and it registers a
    report only when it next polls the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s,
    later under load): a worker killed in that window resumes a checkpoint older than the
    one already uploaded (measured: 16-17 steps redone with checkpoints every 10). The
    uploaded folder is in ``checkpoint_dir``; it is used only if it belongs to this MLflow run and
    every file checks out against its state.json (a partial upload is refused, untouched).
    """
    ends = (cfg.data.s3_endpoint_url, cfg.data.s3_region)
    for step, folder in checkpoint_folders(checkpoint_dir, *ends):
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


# ---- step -----------------------------------------------------------------------------

class Stepper:
    """The optimiser step of every batch, and the count of consecutive skipped steps:
    :data:`MAX_CONSECUTIVE_NONFINITE` non-finite losses in a row stop training (on every
    rank at once: the skip is agreed by all of them)."""

    def __init__(self, w: Setup) -> None:
        from cola_ray.config import n_frames
        from cola_ray.model.augment import Augment

        self.w = w
        self.nonfinite_run = 0
        self.augment = Augment(w.cfg.augment, w.cfg.features)
        self.frames = n_frames(w.cfg.features, w.cfg.data.segment_samples)

    def step(self, batch: Mapping[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], bool]:
        """Forward, backward, update; returns the model's outputs and whether the step was taken."""
        w = self.w
        factor = lr_factor(w.cfg, step)
        # The configured rates, not the restored groups' (a resume may change train.lr).
        for group, base in zip(w.optimizer.param_groups, (w.cfg.train.lr, w.cfg.train.bilinear_lr)):
            group["lr"] = base * factor
        # int16 pairs become float32 on the training device (half the object-store bytes).
        (anchor, positive), keep = model_input(batch), None  # (B_local, S) float32 each
        if self.augment.active:
            gen = self.augment.generator(w.cfg.train.seed, w.rank, step, w.device)
            anchor, positive = self.augment.waves(anchor, positive, gen)
            keep = self.augment.spec_keep(2 * anchor.shape[0], self.frames, gen, w.device)
        with w.autocast:
            # Clip ids (B_local,): crops of an anchor's own clip are masked from its negatives.
            out = w.forward(anchor, positive, batch.get("clip_id"), keep)
        finite = optimizer_step(out["loss"], w.optimizer, w.core, w.cfg.train.grad_clip)
        if finite:
            self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            if self.nonfinite_run >= MAX_CONSECUTIVE_NONFINITE:
                raise FloatingPointError(
                    f"loss was not finite for {self.nonfinite_run} consecutive steps (last at step "
                    f"{step}); stopping"
                )
        return out, finite


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


# ---- log ------------------------------------------------------------------------------

class StepLogger:
    """What the run records between checkpoints, and rank 0's MLflow spool that takes it.

    Owns the step window (loss, accuracy, data wait, skipped steps; averaged over ranks at
    each log step), this rank's same-clip collision rate, the bad-sample tallies (snapshots
    of the ``SampleCounter`` actor; the error budget judged on rank 0 and raised on every
    rank together; quarantined shards named in a tag), the restore tags, and
    :attr:`spool`: rank 0's :class:`SpooledLogger` (``None`` on the other ranks). Every
    rank calls :meth:`log` and :meth:`log_rest`: they hold collectives.
    """

    def __init__(self, w: Setup, run: Mapping[str, Any], resumed: Resumed | None) -> None:
        self.w = w
        self.counter = run.get("counter")
        # Rank 0 logs through a local spool drained by a thread: MLflow being slow or down never
        # blocks a step, and steps already in the run (re-trained after a restore) are not re-logged.
        self.spool = (SpooledLogger(run["tracking_uri"], run["mlflow_run_id"], run["spool_dir"])
                      if w.rank == 0 else None)
        if self.spool is not None and resumed is not None:
            self.spool.set_tags({"cola_ray.restored_from_step": resumed.step,
                                 "cola_ray.ray_checkpoint_step": resumed.ray_step,
                                 "cola_ray.restored_world_size": w.world,
                                 "cola_ray.restored_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        # Rank 0's figures to the driver's progress line (fire and forget: never blocks a step).
        self.board = run.get("progress") if w.rank == 0 else None
        self.window = _Window()
        # Each local batch's clip ids in the window, left on the device until the log step.
        self.collision_ids: list[Any] = []
        self.quarantined: dict[str, str] = {}  # shard -> why, as last tagged on the MLflow run

    def add(self, batch: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor], finite: bool, *,
            wait: float, total: float) -> None:
        """Count one step into the window: ``wait`` for its batch, ``total`` with the step."""
        if "clip_id" in batch:
            self.collision_ids.append(batch["clip_id"])
        self.window.add(out["loss"].detach(), out["accuracy"].detach(), wait=wait, total=total,
                        skipped=not finite)

    def log(self, state: TrainState, lr: float) -> None:
        """The window's metrics at ``state.step``, with lr, epoch, collisions and sample tallies."""
        w = self.w
        metrics = self.window.reduce(w.cfg.train.batch_size)
        metrics.update(lr=lr, epoch=state.epoch)
        if self.collision_ids:  # this rank's local batches (rank 0 logs); one copy to the host
            ids = torch.stack([torch.as_tensor(i) for i in self.collision_ids]).cpu().numpy()
            metrics["data/collision_rate"] = float(np.mean([collision_rate(row) for row in ids]))
            self.collision_ids.clear()
        if self.counter is not None:
            snap = _snapshot(self.counter) if w.rank == 0 else None
            if w.rank == 0 and snap is not None:
                metrics.update(_sample_metrics(snap))
                if self.spool is not None and snap.get("bad_shards", {}) != self.quarantined:
                    self.quarantined = dict(snap["bad_shards"])  # named in the run, not only counted
                    self.spool.set_tags({"cola_ray.quarantined_shards": "; ".join(
                        f"{k}: {v}" for k, v in sorted(self.quarantined.items()))[:5000]})
            _fail_together(w.rank, snap, w.cfg, w.device)
        if self.spool is not None:
            self.spool.log_metrics(metrics, step=state.step)
        progress.post(self.board, {**{k: metrics[k] for k in progress.FIELDS if k in metrics},
                                   "step": state.step, "total_steps": w.cfg.train.max_steps})

    def log_epoch(self, metrics: Mapping[str, float], state: TrainState) -> None:
        """An epoch's clip tallies (:meth:`EpochClips.epoch_metrics`) at its last step; repeats warned."""
        if self.w.rank != 0:
            return
        if metrics.get("data/epoch_repeats"):
            log.warning("epoch %d delivered %d clip(s) more than once", state.epoch, int(metrics["data/epoch_repeats"]))
        if self.spool is not None:
            self.spool.log_metrics(dict(metrics), step=state.step)

    def log_eval(self, metrics: Mapping[str, float], step: int) -> None:
        """Rank 0's online-evaluation results at ``step``: to MLflow, and one line to the log."""
        log.info("step %d: online evaluation %s", step, ", ".join(
            f"{k.split('/')[1]} {v:.1%}" for k, v in metrics.items() if k.endswith("/accuracy")))
        if self.spool is not None:
            self.spool.log_metrics(dict(metrics), step=step)
        progress.post(self.board, metrics, kind="eval")

    def log_rest(self, state: TrainState) -> None:
        """The steps since the last log line (the same count on every rank)."""
        if self.window.steps:
            metrics = self.window.reduce(self.w.cfg.train.batch_size)
            if self.spool is not None:
                self.spool.log_metrics(metrics, step=state.step)

    def flush(self) -> bool:
        """Deliver the spool within ``tracking.flush_timeout_s``; True on rank 0 when all of it
        is in MLflow (a record left behind is named with the command that delivers it)."""
        if self.spool is None:
            return False
        cfg, spool = self.w.cfg, self.spool
        left = spool.close(timeout=cfg.tracking.flush_timeout_s)
        if left:
            # Training is done and checkpointed; only the tracking copy is behind.
            log.warning("MLflow %s did not take %d record(s) within %.0fs; they are in %s. Deliver them with: "
                        "cola-ray replay-metrics %s --tracking-uri <uri>", redact(spool.uri), left,
                        cfg.tracking.flush_timeout_s, spool.spool, spool.spool)
            return False  # the encoder is in the final checkpoint (cola-ray export) rather than in MLflow
        return True

    def log_model(self, core: torch.nn.Module) -> None:
        """With ``tracking.log_model``: the encoder as an MLflow model, its URI tagged on the run."""
        cfg = self.w.cfg
        if self.spool is None or not cfg.tracking.log_model:
            return
        # Batch of 2: MLflow exports (torch.export, no pickle) with a dynamic batch dimension.
        example = torch.zeros(2, cfg.data.segment_samples).numpy()
        uri = self.spool.client.log_encoder(core.encoder, example, cfg.tracking.registered_model_name)
        self.spool.client.set_tags({"cola_ray.encoder_uri": uri})


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
    out["data/int16_lossy_pairs"] = float(snap.get("int16_lossy_pairs", 0))
    out["data/quarantine_skips"] = float(snap.get("quarantine_skips", 0))  # reads of quarantined shards not made
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


# ---- checkpoint -----------------------------------------------------------------------

class Checkpointer:
    """The run's checkpoints ``checkpoint_<step:09d>``: rank 0 writes the folder (model,
    optimiser, train state) and attaches it to ``ray.train.report``, which every rank calls
    (a barrier); with ``tracking.log_checkpoints`` rank 0's spool copies it to MLflow.
    Remembers the last step saved, so the finish saves only a step not saved yet."""

    def __init__(self, w: Setup, spool: SpooledLogger | None, step: int, clips: EpochClips,
                 counter: Any | None = None) -> None:
        self.w, self.spool, self.clips, self.counter = w, spool, clips, counter
        self.last_step = step

    def save(self, state: TrainState, validate: bool = False) -> None:
        """Checkpoint ``state``, with the epoch's clips so far (gathered from every rank);
        with ``validate``, Ray Train evaluates it (``eval.mode=async``)."""
        w = self.w
        state.epoch_clips = self.clips.gathered()  # collective: every rank saves at the same steps
        metrics = {"step": state.step, "epoch": state.epoch}
        name = f"checkpoint_{state.step:09d}"
        self.last_step = state.step
        if w.rank != 0:  # validation goes with the checkpoint (Ray refuses it without one)
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        validation = ray.train.ValidationTaskConfig(fn_kwargs={"step": state.step}) if validate else False
        snap = _snapshot(self.counter) if self.counter is not None else None
        if snap is not None:  # the run's quarantine goes with the checkpoint (lost counter: the last one kept)
            state.quarantine = snap.get("quarantine", state.quarantine)
        with tempfile.TemporaryDirectory(prefix="cola-ckpt-") as tmp:
            save_checkpoint(tmp, w.core, w.optimizer, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name, validation=validation)
            if self.spool is not None and w.cfg.tracking.log_checkpoints:
                self.spool.log_artifacts(tmp, f"checkpoints/{name}")

    def save_if_behind(self, state: TrainState) -> None:
        if state.step != self.last_step:
            self.save(state)
