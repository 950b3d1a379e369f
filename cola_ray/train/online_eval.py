"""Online evaluation during pre-training (``eval.every_steps``, ``eval.tasks``).

Pre-training's own loss and in-batch accuracy say whether the contrastive task is being
learnt, not whether the representation is getting better for anything else (on real audio
the two part ways: 79% in-batch accuracy, worse than log-mel features downstream). So,
every ``eval.every_steps``, the encoder of that step embeds a few hundred labelled clips of
each task and a fast probe scores it::

    task shards --decoded_clips (once per process)--> segments of every clip, kept in memory
    encoder(segments) -> mean over a clip's segments -> h (clips, D)
    standardised logistic regression on train (full-batch Adam) -> accuracy on eval.split
    -> MLflow "eval/<task>/accuracy" at that step

Two ways to run it (``eval.mode``):

- ``async`` (default): the step's checkpoint is reported with ``validation=`` and Ray
  Train runs :func:`validate_checkpoint` on it as a Ray task with its own
  ``eval.num_cpus``, while the workers train on; the task logs to the MLflow run itself.
- ``inline``: world rank 0 runs :class:`OnlineEval` between two steps; the other ranks
  wait at their next collective.

The probe is not the paper's protocol (100 epochs of random segments, clip-level logits):
it is a cheap monitor, seconds per task, whose trend follows the protocol's. A failing
evaluation is logged and counted (``eval/failures``), never raised into training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cola_ray.config import Config
from cola_ray.data import pipeline, shards
from cola_ray.data.audio import split_segments

log = logging.getLogger(__name__)


@dataclass
class EvalTask:
    """One task's clips in memory: ``segments`` (N, S) float32 with ``clip`` (N,) the clip
    index of each segment, and per clip its ``label`` index and ``split``."""

    name: str
    segments: np.ndarray
    clip: np.ndarray
    label: np.ndarray
    split: np.ndarray
    classes: list[str]


def load_task(url: str, cfg: Config) -> EvalTask:
    """The first ``eval.max_clips`` labelled clips of the train split and of ``eval.split``
    of the task shards at ``url``; raises ``ValueError`` naming the folder if either is empty."""
    d, e = cfg.data, cfg.eval
    wanted = {"train": 0, e.split: 0}
    segments, clip, labels, splits = [], [], [], []
    for shard in shards.shard_urls(url, d.s3_endpoint_url, d.s3_region):
        if all(n >= e.max_clips for n in wanted.values()):
            break
        tally = pipeline.ShardTally(os.path.basename(shard))
        keep: Callable[[dict[str, Any]], bool] = lambda m: (m.get("split") in wanted and wanted[m["split"]] < e.max_clips
                                                            and bool(m.get("label", "")))
        for _, meta, wave in pipeline.decoded_clips(shard, d.sample_rate, tally, endpoint_url=d.s3_endpoint_url,
                                                    region=d.s3_region, keep=keep):
            segs, _ = split_segments(wave, d.segment_samples)
            segments.append(segs[:4])  # at most 4 segments (3.9 s) a clip: enough for a monitor
            clip.extend([len(labels)] * len(segs[:4]))
            labels.append(str(meta["label"]))
            splits.append(meta["split"])
            wanted[meta["split"]] += 1
    classes = sorted(set(labels[i] for i in range(len(labels)) if splits[i] == "train"))
    for split, n in wanted.items():
        if not n:
            raise ValueError(f"eval.tasks: {url} has no labelled clip in its {split!r} split")
    index = {c: i for i, c in enumerate(classes)}
    return EvalTask(_task_name(url, cfg), np.concatenate(segments), np.asarray(clip),
                    np.asarray([index.get(label, -1) for label in labels]), np.asarray(splits), classes)


def task_urls(cfg: Config) -> list[str]:
    """``eval.tasks``, comma-separated, as a list of folders."""
    return [u.strip() for u in cfg.eval.tasks.split(",") if u.strip()]


def due(cfg: Config, step: int) -> bool:
    """Whether ``step`` is an evaluation step (``eval.every_steps``; 0 = never)."""
    return bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0


def load_tasks(cfg: Config) -> list[EvalTask]:
    """Every ``eval.tasks`` folder, loaded; tasks that share a name (two made by one generic
    adapter, say) are named after their folders instead, so no metric overwrites another."""
    urls = task_urls(cfg)
    tasks = [load_task(url, cfg) for url in urls]
    names = [t.name for t in tasks]
    for task, url in zip(tasks, urls):
        if names.count(task.name) > 1:
            task.name = os.path.basename(url.rstrip("/"))  # as _task_name names a folder
    return tasks


def check_tasks(cfg: Config) -> None:
    """On the driver, before any worker starts: every ``eval.tasks`` folder holds shards
    with labelled clips in train and ``eval.split`` (task.json's counts, else the samples'
    own json); ``ValueError`` names the folder."""
    from cola_ray.data import storage

    for url in task_urls(cfg):
        try:
            urls = shards.shard_urls(url, cfg.data.s3_endpoint_url, cfg.data.s3_region)
        except (OSError, ValueError, shards.ShardError) as e:
            raise ValueError(f"eval.tasks: {url} is not a folder of labelled shards "
                             f"(cola-ray tasks prepare): {e}") from None
        try:
            meta = json.loads(storage.read_bytes(f"{url.rstrip('/')}/task.json", cfg.data.s3_endpoint_url,
                                                 cfg.data.s3_region))
        except (OSError, ValueError):
            meta = None
        if not urls:
            raise ValueError(f"eval.tasks: {url} holds no shards")
        if meta is None or "splits" not in meta:
            # Labelled shards without the count (cola-ray shards build --labels, the demo's, the
            # tests'): read samples' json members, no audio, until both splits show up.
            splits = _splits_seen(urls, {"train", cfg.eval.split}, cfg)
        else:
            splits = {k for k, n in meta["splits"].items() if n}
        missing = {"train", cfg.eval.split} - splits
        if missing:
            raise ValueError(f"eval.tasks: {url} has no {' or '.join(sorted(missing))} "
                             f"split to evaluate on (its splits: {sorted(splits)})")


def _splits_seen(urls: list[str], wanted: set[str], cfg: Config) -> set[str]:
    """The splits of labelled samples in ``urls``, read until ``wanted`` are all seen."""
    from cola_ray.data import storage

    seen: set[str] = set()
    for url in urls:
        with storage.open_input(url, cfg.data.s3_endpoint_url, cfg.data.s3_region) as stream:
            for item in shards.iter_samples(stream, url, suffixes=("json",)):
                if isinstance(item, tuple) and "json" in item[1]:
                    meta = json.loads(item[1]["json"])
                    if meta.get("label", "") != "" and meta.get("split"):
                        seen.add(str(meta["split"]))
                if wanted <= seen:
                    return seen
    return seen


def _task_name(url: str, cfg: Config) -> str:
    """task.json's name (``cola-ray tasks prepare``), else the folder's."""
    from cola_ray.data import storage

    try:
        meta = json.loads(storage.read_bytes(f"{url.rstrip('/')}/task.json", cfg.data.s3_endpoint_url,
                                             cfg.data.s3_region))
        return str(meta.get("task") or os.path.basename(url.rstrip("/")))
    except (OSError, ValueError):
        return os.path.basename(url.rstrip("/"))


@torch.no_grad()
def clip_embeddings(encoder: torch.nn.Module, task: EvalTask, device: torch.device, batch: int = 64) -> torch.Tensor:
    """(clips, D) float32 on the CPU: the mean of each clip's segment embeddings."""
    was_training = encoder.training
    encoder.eval()
    try:
        h = torch.cat([encoder(torch.from_numpy(task.segments[i:i + batch]).to(device)).float().cpu()
                       for i in range(0, len(task.segments), batch)])
    finally:
        encoder.train(was_training)
    n = len(task.label)
    out = torch.zeros(n, h.shape[1]).index_add_(0, torch.from_numpy(task.clip), h)
    return out / torch.bincount(torch.from_numpy(task.clip), minlength=n).clamp_min(1)[:, None].float()


def probe_accuracy(h: torch.Tensor, y: np.ndarray, train: np.ndarray, test: np.ndarray, classes: int,
                   steps: int, seed: int = 0) -> float:
    """Standardised logistic regression fitted on ``h[train]`` (full batch, Adam, weight
    decay 1e-3), accuracy on ``h[test]`` (clips whose label the train split lacks count wrong)."""
    target = torch.from_numpy(y)
    mean, std = h[train].mean(0), h[train].std(0).clamp_min(1e-6)
    x = (h - mean) / std
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(h.shape[1], classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-3)
    xt, yt = x[train], target[train]
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(layer(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        return float((layer(x[test]).argmax(1) == target[test]).float().mean())


class OnlineEval:
    """World rank 0's evaluator: the tasks loaded once, :meth:`run` at every ``eval.every_steps``."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.failures = 0
        t0 = time.monotonic()
        self.tasks = load_tasks(cfg)
        log.info("online evaluation: %s loaded in %.1fs", ", ".join(
            f"{t.name} ({len(t.label)} clips, {len(t.classes)} classes)" for t in self.tasks), time.monotonic() - t0)

    def due(self, step: int) -> bool:
        return due(self.cfg, step)

    def run_safely(self, encoder: torch.nn.Module) -> dict[str, float]:
        """:meth:`run`, but a failing evaluation is logged and counted (``eval/failures``),
        never raised: a monitor must not stop days of training."""
        try:
            return {**self.run(encoder), "eval/failures": float(self.failures)}
        except Exception as e:  # noqa: BLE001 - any failure of the monitor
            self.failures += 1
            log.warning("online evaluation failed (%d so far), training goes on: %s: %s", self.failures,
                        type(e).__name__, e)
            return {"eval/failures": float(self.failures)}

    def run(self, encoder: torch.nn.Module) -> dict[str, float]:
        """``{"eval/<task>/accuracy": ..., "eval/seconds": ...}`` for the encoder as it is now."""
        return evaluate(self.tasks, encoder, self.cfg, self.device)


def evaluate(tasks: list[EvalTask], encoder: torch.nn.Module, cfg: Config, device: torch.device) -> dict[str, float]:
    """``{"eval/<task>/accuracy": ..., "eval/seconds": ...}`` of ``encoder`` on ``tasks``."""
    t0, out = time.monotonic(), {}
    for task in tasks:
        h = clip_embeddings(encoder, task, device)
        train = np.flatnonzero((task.split == "train") & (task.label >= 0))
        test = np.flatnonzero(task.split == cfg.eval.split)
        y = np.where(task.label >= 0, task.label, len(task.classes))  # unknown: never predicted
        out[f"eval/{task.name}/accuracy"] = probe_accuracy(h, y, train, test, len(task.classes),
                                                           cfg.eval.probe_steps, cfg.train.seed)
    out["eval/seconds"] = time.monotonic() - t0
    return out


# ---- async: Ray Train's validation task ---------------------------------------------------

_LOADED: dict[tuple, list[EvalTask]] = {}
"""Tasks decoded by this process, by what decides their content: Ray reuses a worker
process for the next validation task, which then skips the decode."""


def validate_checkpoint(checkpoint: Any, *, step: int, config: dict[str, Any], run: dict[str, Any]) -> dict[str, float]:
    """Ray Train's validation function (``eval.mode=async``, ``ray.train.ValidationConfig``):
    the encoder of ``checkpoint`` (a ``ray.train.Checkpoint`` of ``step``) scored on
    ``eval.tasks``; the metrics go to the MLflow run ``run["mlflow_run_id"]`` at ``step`` and
    back to Ray Train (the checkpoint's validation metrics). Never raises: a failure is
    logged, counted in ``eval/failures`` (the run's count so far + 1) and returned."""
    from cola_ray.train.checkpoint import load_encoder

    cfg = Config.from_dict(config)
    torch.set_num_threads(max(1, int(cfg.eval.num_cpus)))  # the CPUs Ray gave this task, not the node's
    device = torch.device("cuda" if cfg.eval.num_gpus and torch.cuda.is_available() else "cpu")
    client = _client(run)
    try:
        e, d = cfg.eval, cfg.data
        key = (e.tasks, e.split, e.max_clips, d.sample_rate, d.segment_samples)
        if key not in _LOADED:
            _LOADED[key] = load_tasks(cfg)
        with checkpoint.as_directory() as folder:
            encoder = load_encoder(folder).to(device)
        metrics = evaluate(_LOADED[key], encoder, cfg, device)
        metrics["eval/failures"] = _failures_so_far(client, run)
        log.info("step %d: online evaluation %s", step, ", ".join(
            f"{k.split('/')[1]} {v:.1%}" for k, v in metrics.items() if k.endswith("/accuracy")))
    except Exception as err:  # noqa: BLE001 - a monitor must not stop days of training
        metrics = {"eval/failures": _failures_so_far(client, run) + 1}
        log.warning("online evaluation of step %d failed (%d so far), training goes on: %s: %s", step,
                    int(metrics["eval/failures"]), type(err).__name__, err)
    from cola_ray.train import progress

    progress.post(run.get("progress"), metrics, kind="eval")  # the driver's progress line
    if client is not None:
        from mlflow.entities import Metric

        try:
            client.log_batch(run["mlflow_run_id"], metrics=[
                Metric(k, float(v), int(time.time() * 1000), step) for k, v in metrics.items()])
        except Exception as err:  # noqa: BLE001 - the figures stay with the checkpoint in Ray Train
            log.warning("online evaluation of step %d: MLflow did not take it: %s", step, err)
    return metrics


def _client(run: dict[str, str]) -> Any:
    if not run.get("tracking_uri") or not run.get("mlflow_run_id"):
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(run["tracking_uri"])


def _failures_so_far(client: Any, run: dict[str, str]) -> float:
    """The run's last ``eval/failures`` (0 if none or MLflow cannot say)."""
    if client is None:
        return 0.0
    try:
        return float(client.get_run(run["mlflow_run_id"]).data.metrics.get("eval/failures", 0.0))
    except Exception:  # noqa: BLE001
        return 0.0
