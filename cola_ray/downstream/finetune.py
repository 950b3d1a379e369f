"""End-to-end fine-tuning of an encoder + linear layer on a labelled task, with Ray Train.

The paper's "COLA fine-tuned" and "supervised" columns of Table 1: the same protocol as
the linear probe (:mod:`cola_ray.downstream.probe`), but the encoder is trained too::

    shard urls --(random order)--> decode_and_crop_labelled (Ray Data tasks)
        --> rows {"wave": float32 (S,), "label": int64}      fresh crops every epoch
        --> streaming_split across Ray Train workers --> encoder + Linear under DDP

- Train: every epoch, ONE random 15600-sample crop of every labelled TRAIN clip (drawn
  anew each epoch), L2-normalised like the evaluation segments, cross-entropy, AdamW
  (``weight_decay`` 0 = Adam), one learning rate for encoder and layer. BatchNorm is in
  train mode: the encoder is being trained.
- Evaluate (clip level, BatchNorm in inference mode): the segment grid of
  :func:`cola_ray.downstream.embed.split_segments` (``remainder="end"`` by default), each segment
  through the encoder, then :func:`cola_ray.downstream.probe.evaluate` with the model's layer:
  logits averaged over each clip's segments, exactly as the probe. Validation after
  every epoch; test ONCE at the end, with the weights of the best validation epoch
  (``select="best"``, earliest on ties) or of the last epoch (``select="last"``).
  Each worker encodes the clips of every ``world``-th shard; rank 0 gathers them.

``from_scratch=True`` is the supervised baseline: the reference's architecture (its
features and timm backbone; ``random:<timm>`` names one directly) with random weights.
One MLflow run per call, tagged ``cola_ray.task`` and ``cola_ray.baseline`` ("COLA
fine-tuned", or "supervised" from scratch / for a ``random:`` encoder), which is what
:func:`cola_ray.downstream.report.report` reads::

    r = finetune("runs/cola-1/checkpoint_000010000", "shards/spc2", epochs=30, num_workers=4, use_gpu=True)
    r.val_accuracy, r.test_accuracy, r.checkpoint
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from cola_ray import console
from cola_ray.data import audio, pipeline, shards, storage
from cola_ray.downstream import notes
from cola_ray.train import cluster, progress
from cola_ray.train.paths import storage_root
from cola_ray.model import distributed
from cola_ray.downstream.probe import (BASELINE_TAG, DEFAULT_EXPERIMENT, ENCODER_TAG, KIND_TAG, TASK_TAG, check_baseline,
                            evaluate, log_evaluation, log_metrics, log_params, open_tracking)

SELECT = ("best", "last")
WEIGHTS_FILE = "model.safetensors"
META_FILE = "finetune.json"


def default_baseline(encoder_ref: str, from_scratch: bool) -> str:
    """``supervised`` for random weights (``from_scratch`` or ``random:``), else ``COLA fine-tuned``."""
    return "supervised" if from_scratch or encoder_ref.startswith("random:") else "COLA fine-tuned"


# ---- the model ------------------------------------------------------------------------

class Classifier(nn.Module):
    """Encoder f + Linear: waveforms (B, S) -> logits (B, C); ``head`` sees f's ``h`` (B, D)."""

    def __init__(self, encoder: nn.Module, embedding_dim: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(embedding_dim, n_classes)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(wave))


def build_encoder(encoder_ref: str, *, from_scratch: bool = False, seed: int = 0,
                  tracking_uri: str = "") -> tuple[nn.Module, dict[str, Any]]:
    """The encoder to fine-tune: the reference's weights, or (``from_scratch``) its architecture
    freshly initialised from ``seed``. Returns ``(encoder in train mode, resolve_encoder's info)``."""
    from cola_ray.config import Config
    from cola_ray.model.encoder import WaveformEncoder
    from cola_ray.downstream.encoders import resolve_encoder

    encoder, info = resolve_encoder(encoder_ref, tracking_uri=tracking_uri)
    if from_scratch:
        cfg = Config.from_dict({"features": info["features"], "model": info["model"]})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = WaveformEncoder(cfg.features, cfg.model)
    return encoder.train(), info


# ---- Ray Data: labelled train crops -----------------------------------------------------

def decode_and_crop_labelled(row: dict[str, Any], cfg: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One shard -> one random crop per labelled train clip: ``{"wave": (S,) float32, "label": int64}``.

    A clip shorter than S is zero-padded, centred; the crop is L2-normalised, as every
    evaluation segment is. Only numeric columns: ``iter_torch_batches`` refuses strings.
    Undecodable samples and unknown labels are skipped.
    """
    index = {c: i for i, c in enumerate(cfg["classes"])}
    n = cfg["segment_samples"]
    rng = np.random.default_rng()  # fresh entropy on every read: new crops every epoch
    url = row["shard"]
    wanted = lambda meta: meta.get("split") == cfg["split"] and str(meta.get("label", "")) in index  # noqa: E731
    tally = pipeline.ShardTally(os.path.basename(url))
    for _, meta, wave in pipeline.decoded_clips(url, cfg["sample_rate"], tally, endpoint_url=cfg["endpoint_url"],
                                                region=cfg["region"], keep=wanted):
        wave = audio.pad_center(wave, n)
        start = int(rng.integers(0, wave.shape[0] - n + 1))
        yield {"wave": audio.l2_normalize(wave[start : start + n]),
               "label": np.int64(index[str(meta["label"])])}


def read_train_crops(urls: list[str], cfg: dict[str, Any], decode_num_cpus: float) -> ray.data.Dataset:
    """The lazy train dataset; Ray Train re-executes it every epoch (new shard order, new crops)."""
    return (ray.data.from_items([{"shard": u} for u in urls], override_num_blocks=len(urls))
            .randomize_block_order()  # one shard per block: a fresh shard order each epoch
            .flat_map(decode_and_crop_labelled, fn_kwargs={"cfg": {**cfg, "split": "train"}},
                      num_cpus=decode_num_cpus))


# ---- evaluation: every segment of every clip, clip-level as the probe -----------------------

@torch.no_grad()
def encode_split(encoder: nn.Module, urls: list[str], split: str, cfg: dict[str, Any], device: torch.device,
                 batch_size: int) -> dict[str, np.ndarray]:
    """Every segment of every labelled ``split`` clip in ``urls`` -> ``{"h" (N, D), "clip" (N,), "label_index" (N,)}``.

    Segments come from :func:`cola_ray.downstream.embed.decode_segments`, the grid the probe's
    embeddings are made of. The caller sets the encoder's mode (eval for evaluation).
    """
    from cola_ray.downstream.embed import decode_segments

    index = {c: i for i, c in enumerate(cfg["classes"])}
    h, clips, labels, pending = [], [], [], []

    def flush() -> None:
        wave = torch.from_numpy(np.stack([p["wave"] for p in pending])).to(device)  # (B, S)
        h.append(encoder(wave).float().cpu().numpy())
        clips.extend(p["clip"] for p in pending)
        labels.extend(index[p["label"]] for p in pending)
        pending.clear()

    for url in urls:
        for seg in decode_segments({"shard": url}, cfg):
            if seg["split"] == split and seg["label"] in index:
                pending.append(seg)
                if len(pending) == batch_size:
                    flush()
    if pending:
        flush()
    dim = getattr(encoder, "embedding_dim", 0)
    return {"h": np.concatenate(h) if h else np.zeros((0, dim), np.float32),
            "clip": np.asarray(clips, dtype=str), "label_index": np.asarray(labels, dtype=np.int64)}


def evaluate_split(core: Classifier, urls: list[str], split: str, cfg: dict[str, Any], device: torch.device,
                   batch_size: int) -> dict[str, Any]:
    """Clip-level :func:`cola_ray.downstream.probe.evaluate` of ``core`` on ``split``, over all ranks.

    Every rank encodes the clips of every ``world``-th shard and gathers the others', so
    all ranks get the same result (and take the same best-epoch decision).
    """
    rank, world = distributed.rank(), distributed.world_size()
    was_training = core.training
    core.eval()  # BatchNorm in inference mode for evaluation
    local = encode_split(core.encoder, urls[rank::world], split, cfg, device, batch_size)
    core.train(was_training)
    parts = [local]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)
    emb = {k: np.concatenate([p[k] for p in parts]) for k in ("h", "clip", "label_index")}
    emb["split"] = np.full(emb["clip"].shape[0], split)
    emb["classes"] = np.asarray(cfg["classes"], dtype=str)
    return evaluate(copy.deepcopy(core.head).cpu(), emb, split)


# ---- the worker -----------------------------------------------------------------------------

def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """``loop_config = {"settings": {...}, "data": {...}, "urls": [...], "run": {tracking_uri, mlflow_run_id}}``."""
    s, data, urls, run = loop_config["settings"], loop_config["data"], loop_config["urls"], loop_config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(s["cpus_per_worker"])))
    torch.manual_seed(s["seed"])  # the same layer on every rank (DDP also broadcasts rank 0's)

    encoder, info = build_encoder(s["encoder_ref"], from_scratch=s["from_scratch"], seed=s["seed"],
                                  tracking_uri=run["tracking_uri"])
    model = Classifier(encoder, int(info["embedding_dim"]), len(data["classes"]))
    model = ray.train.torch.prepare_model(model)
    core: Classifier = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(core.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])

    client = None
    if rank == 0 and run["mlflow_run_id"]:  # a Tune trial's child run is written by the driver
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run["tracking_uri"])
    run_id = run["mlflow_run_id"]
    local_batch = max(1, s["batch_size"] // world)
    shard = ray.train.get_dataset_shard("train")
    best = {"epoch": 0, "accuracy": -math.inf, "state": None}
    history: list[dict[str, float]] = []

    for epoch in range(1, s["epochs"] + 1):
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
        for batch in shard.iter_torch_batches(batch_size=local_batch, local_shuffle_buffer_size=256,
                                              dtypes={"wave": torch.float32, "label": torch.int64},
                                              device=device):
            wave, label = batch["wave"], batch["label"]  # (B, S), (B,)
            if wave.shape[0] < 2:
                # Train-mode BatchNorm cannot normalise one sample. Ray splits the rows
                # equally, so every rank meets this same short last batch and skips it.
                continue
            logits = model(wave)
            loss = F.cross_entropy(logits, label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = label.shape[0]
            sums += torch.tensor([loss.item() * n, float((logits.argmax(1) == label).sum()), n], dtype=torch.float64)
        distributed.all_reduce(sums)
        if sums[2] == 0:
            raise RuntimeError(f"epoch {epoch}: no train batch of 2 or more clips reached the workers; "
                               f"the task at {s['task']!r} has too few labelled train clips for {world} workers")
        val = evaluate_split(core, urls, "validation", data, device, local_batch)
        record = {"epoch": epoch, "train_loss": float(sums[0] / sums[2]), "train_accuracy": float(sums[1] / sums[2]),
                  "epoch_val_accuracy": val["accuracy"], "epoch_val_loss": val["loss"]}
        history.append(record)
        if client is not None:
            log_metrics(client, run_id, {k: v for k, v in record.items() if k != "epoch" and not math.isnan(v)},
                        step=epoch)
        # Every rank holds the same gathered result, hence takes the same decision.
        if s["select"] == "best" and val["accuracy"] > best["accuracy"]:
            best = {"epoch": epoch, "accuracy": val["accuracy"],
                    "state": {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}}
        ray.train.report({k: v for k, v in record.items()})  # every rank: it is a barrier
        if rank == 0:  # the driver's progress line (fire and forget)
            progress.post(run.get("progress"), {
                "step": epoch, "total_steps": s["epochs"], "loss": record["train_loss"],
                "accuracy": record["train_accuracy"], "val_accuracy": record["epoch_val_accuracy"]})

    if not s["test"]:
        return  # a sweep trial: selected on validation by Tune; test is the driver's, once
    selected = s["epochs"]
    if best["state"] is not None:  # select="last", or no validation clips: the final weights
        core.load_state_dict(best["state"])
        selected = best["epoch"]
    val = evaluate_split(core, urls, "validation", data, device, local_batch)
    test = evaluate_split(core, urls, "test", data, device, local_batch)
    final = {"epoch": s["epochs"], "selected_epoch": selected, "val_accuracy": val["accuracy"],
             "test_accuracy": test["accuracy"], "test_per_class": test["per_class"]}
    if rank != 0:
        ray.train.report(final, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="cola-finetune-") as tmp:
        save_model(core, data["classes"], info, selected, Path(tmp))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        log_metrics(client, run_id, {"selected_epoch": selected})
        log_evaluation(client, run_id, val, data["classes"], "val")
        log_evaluation(client, run_id, test, data["classes"], "test")
        if s["log_model"]:
            client.log_artifacts(run_id, tmp, "finetuned")


def save_model(core: Classifier, classes: list[str], info: Mapping[str, Any], epoch: int, folder: Path) -> None:
    """``model.safetensors`` (``encoder.*`` + ``head.*``) and ``finetune.json`` (classes, architecture, epoch)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}, str(folder / WEIGHTS_FILE))
    meta = {"classes": list(classes), "epoch": epoch, "encoder": info.get("encoder"),
            "embedding_dim": info.get("embedding_dim"), "features": info.get("features"), "model": info.get("model")}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


# ---- the driver -----------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    run_id: str
    val_accuracy: float
    """Clip accuracy on validation of the selected weights."""
    test_accuracy: float
    selected_epoch: int
    per_class: dict[str, float]
    checkpoint: str | None
    """Ray Train's checkpoint folder: ``model.safetensors`` + ``finetune.json``."""
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FinetuneJob:
    """What every fine-tuning run of one encoder on one task shares; a sweep's trials
    override ``settings`` (lr, weight decay, epochs) and nothing else."""

    settings: dict[str, Any]
    """Passed to the workers: encoder_ref, task, from_scratch, lr, weight_decay, epochs,
    batch_size, seed, select, cpus_per_worker, log_model, test."""
    data: dict[str, Any]
    """classes, sample_rate, segment_samples, remainder, endpoint_url, region."""
    urls: list[str]
    task_name: str
    baseline: str
    info: dict[str, Any]
    """:func:`cola_ray.downstream.encoders.resolve_encoder`'s description of the encoder."""

    def lineage_tags(self, tracking_uri: str) -> dict[str, str]:
        """The tags of :meth:`cola_ray.downstream.encoders.Lineage.tags` for this job's runs."""
        from cola_ray.downstream.encoders import lineage

        return lineage(self.settings["encoder_ref"], self.info, tracking_uri=tracking_uri,
                       from_scratch=bool(self.settings["from_scratch"])).tags()

    def with_settings(self, **changes: Any) -> "FinetuneJob":
        return FinetuneJob({**self.settings, **changes}, self.data, self.urls, self.task_name, self.baseline,
                           self.info)


def plan(
    encoder_ref: str,
    task: str,
    *,
    from_scratch: bool = False,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    select: str = "best",
    baseline: str = "",
    cpus_per_worker: float = 1.0,
    segment_samples: int = 15600,
    remainder: str = "end",
    sample_rate: int = 16000,
    log_model: bool = True,
    endpoint_url: str = "",
    region: str = "",
    tracking_uri: str = "",
) -> FinetuneJob:
    """Check the arguments and read the task (shards, classes) before any Ray work.

    Bad input fails here, naming it: an unknown ``select`` / ``remainder``, a task path
    without shards, a task without classes, an encoder reference that does not resolve.
    """
    from cola_ray.downstream import embed

    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    if remainder not in embed.REMAINDERS:
        raise ValueError(f"remainder must be one of {embed.REMAINDERS}, got {remainder!r}")
    baseline = check_baseline(baseline or default_baseline(encoder_ref, from_scratch))
    urls = shards.shard_urls(str(task), endpoint_url, region)  # a missing path fails before Ray starts
    if not urls:
        raise FileNotFoundError(f"no *.tar shards found at {task!r}")
    task_meta = embed.read_task(str(task), endpoint_url, region)
    classes = embed.task_classes(task_meta) or train_labels(urls, endpoint_url, region)
    if not classes:
        raise ValueError(f"the task at {task!r} has no task.json classes and no labelled train clip")
    _, info = build_encoder(encoder_ref, from_scratch=from_scratch, seed=seed, tracking_uri=tracking_uri)
    settings = {"encoder_ref": encoder_ref, "task": str(task), "from_scratch": from_scratch, "lr": lr,
                "weight_decay": weight_decay, "epochs": epochs, "batch_size": batch_size, "seed": seed,
                "select": select, "cpus_per_worker": cpus_per_worker, "log_model": log_model, "test": True}
    data = {"classes": classes, "sample_rate": sample_rate, "segment_samples": segment_samples,
            "remainder": remainder, "endpoint_url": endpoint_url, "region": region}
    return FinetuneJob(settings, data, urls, task_meta.get("task") or embed.task_name(str(task)), baseline, info)


def make_trainer(job: FinetuneJob, run: Mapping[str, Any], *, name: str, storage_path: str, num_workers: int,
                 use_gpu: bool, decode_num_cpus: float, callbacks: list | None = None) -> Any:
    """The TorchTrainer of one fine-tuning run, named ``name`` under ``storage_path``.

    ``run = {"tracking_uri", "mlflow_run_id"[, "progress"]}``: the workers log there (an empty
    run id: they log nothing, e.g. in a Tune trial whose child run the driver writes); rank 0
    posts each epoch's figures to the ``progress`` board (:mod:`cola_ray.train.progress`).
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": job.settings, "data": job.data, "urls": job.urls, "run": dict(run)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": job.settings["cpus_per_worker"]}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_root(storage_path),
                                       callbacks=list(callbacks or []),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       # One retry, from the start: a worker lost (or a health check
                                       # missed as Ray shuts the group down under load) costs a rerun
                                       # of a short job, not the run.
                                       failure_config=ray.train.FailureConfig(max_failures=1),
                                       logging_config=console.train_logging_config()),
        datasets={"train": read_train_crops(job.urls, job.data, decode_num_cpus)},
    )


def finetune(
    encoder_ref: str,
    task: str,
    *,
    from_scratch: bool = False,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    select: str = "best",
    baseline: str = "",
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    decode_num_cpus: float = 0.5,
    segment_samples: int = 15600,
    remainder: str = "end",
    sample_rate: int = 16000,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str = "",
    run_name: str = "",
    storage_path: str = "./runs",
    log_model: bool = True,
    endpoint_url: str = "",
    region: str = "",
    ray_address: str = "",
    tags: Mapping[str, str] | None = None,
) -> FinetuneResult:
    """Fine-tune ``encoder_ref`` + a linear layer on the task shards at ``task``; one MLflow run.

    ``batch_size`` is global (split over ``num_workers``). Logged per epoch (step = epoch):
    ``train_loss``, ``train_accuracy`` (on that epoch's crops), ``epoch_val_accuracy``,
    ``epoch_val_loss``; at the end, for the selected weights: ``selected_epoch``,
    ``val_accuracy``, ``test_accuracy``, per-class accuracies and confusion matrices
    (as :func:`cola_ray.downstream.probe.probe` names them), and with ``log_model`` the weights
    (``finetuned/``). The run lives in ``<storage_path>/<run name>`` for Ray Train.
    ``tags`` are added to the run's (e.g. a sweep's parent run id).
    """
    from cola_ray.train import tracking

    job = plan(encoder_ref, task, from_scratch=from_scratch, lr=lr, weight_decay=weight_decay, epochs=epochs,
               batch_size=batch_size, seed=seed, select=select, baseline=baseline, cpus_per_worker=cpus_per_worker,
               segment_samples=segment_samples, remainder=remainder, sample_rate=sample_rate, log_model=log_model,
               endpoint_url=endpoint_url, region=region, tracking_uri=tracking_uri)
    uri, client = open_tracking(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment, uri)
    run_name = run_name or f"finetune-{job.task_name}-{job.baseline.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(exp_id, run_name=run_name, tags={
        KIND_TAG: "finetune", ENCODER_TAG: encoder_ref, TASK_TAG: job.task_name, BASELINE_TAG: job.baseline,
        "cola_ray.from_scratch": str(from_scratch).lower(), **job.lineage_tags(uri), **dict(tags or {})})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        log_params(client, run_id, {**{k: v for k, v in job.settings.items() if k != "test"},
                                    "num_workers": num_workers, "use_gpu": use_gpu,
                                    "segment_samples": segment_samples, "remainder": remainder,
                                    "classes": len(job.data["classes"]), "encoder_name": job.info["encoder"],
                                    "dim": job.info["embedding_dim"]})
        cluster.connect(ray_address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with progress.shown(unit="epoch") as board:  # rank 0's figures per epoch, on the console
            trainer = make_trainer(job, {"tracking_uri": uri, "mlflow_run_id": run_id, "progress": board},
                                   name=run_name, storage_path=storage_path, num_workers=num_workers,
                                   use_gpu=use_gpu, decode_num_cpus=decode_num_cpus)
            result = trainer.fit()
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
        notes.note_finished(client, run_id)
    metrics = dict(result.metrics or {})
    history = _history(client, run_id)
    return FinetuneResult(run_id, float(metrics["val_accuracy"]), float(metrics["test_accuracy"]),
                          int(metrics["selected_epoch"]), dict(metrics.get("test_per_class") or {}),
                          result.checkpoint.path if result.checkpoint is not None else None, history)


def _history(client: Any, run_id: str) -> list[dict[str, float]]:
    """Per-epoch records back from MLflow: ``[{"epoch", "train_loss", ...}, ...]``."""
    by_epoch: dict[int, dict[str, float]] = {}
    for key in ("train_loss", "train_accuracy", "epoch_val_accuracy", "epoch_val_loss"):
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]


def train_labels(urls: list[str], endpoint_url: str = "", region: str = "") -> list[str]:
    """Sorted labels of the train split, read from the samples' json (no audio decoded).

    For tasks without ``task.json``; same rule as :func:`cola_ray.downstream.embed.embed` (every
    label when no sample has a split).
    """
    train, every = set(), set()
    for url in urls:
        with storage.open_input(url, endpoint_url=endpoint_url, region=region) as stream:
            for item in shards.iter_samples(stream, os.path.basename(url)):
                if isinstance(item, audio.BadSample):
                    continue
                key, members = item
                try:
                    meta = shards.sample_meta(members, key)
                except audio.BadSample:
                    continue
                label = str(meta.get("label", ""))
                if label:
                    every.add(label)
                    if meta.get("split") == "train":
                        train.add(label)
    return sorted(train or every)
