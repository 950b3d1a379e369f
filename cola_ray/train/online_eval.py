"""Online evaluation during pre-training (``eval.every_steps``, ``eval.tasks``).

Pre-training's own loss and in-batch accuracy say whether the contrastive task is being
learnt, not whether the representation is getting better for anything else (on real audio
the two part ways: 79% in-batch accuracy, worse than log-mel features downstream). So,
every ``eval.every_steps``, world rank 0 embeds a few hundred labelled clips of each task
with the current encoder (inference mode, no gradient) and fits a fast probe::

    task shards --decoded_clips (rank 0, once)--> segments of every clip, kept in memory
    every N steps: encoder(segments) -> mean over a clip's segments -> h (clips, D)
    standardised logistic regression on train (full-batch Adam) -> accuracy on eval.split
    -> MLflow "eval/<task>/accuracy" at that step

The probe is not the paper's protocol (100 epochs of random segments, clip-level logits):
it is a cheap monitor, seconds per task, whose trend follows the protocol's. The other ranks
go on to their next collective and wait there meanwhile. Nothing here touches Ray.
"""

from __future__ import annotations

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


def check_tasks(cfg: Config) -> None:
    """On the driver, before any worker starts: every ``eval.tasks`` folder holds shards and
    a task.json whose splits include train and ``eval.split``; ``ValueError`` names the folder."""
    import json

    from cola_ray.data import storage

    for url in (u.strip() for u in cfg.eval.tasks.split(",") if u.strip()):
        try:
            urls = shards.shard_urls(url, cfg.data.s3_endpoint_url, cfg.data.s3_region)
            meta = json.loads(storage.read_bytes(f"{url.rstrip('/')}/task.json", cfg.data.s3_endpoint_url,
                                                 cfg.data.s3_region))
        except (OSError, ValueError, shards.ShardError) as e:
            raise ValueError(f"eval.tasks: {url} is not a task folder (cola-ray tasks prepare): {e}") from None
        if not urls:
            raise ValueError(f"eval.tasks: {url} holds no shards")
        if "splits" not in meta:  # tasks made by hand (the tests' synthetic ones) may not count them
            continue
        splits = {k for k, n in meta["splits"].items() if n}
        missing = {"train", cfg.eval.split} - splits
        if missing:
            raise ValueError(f"eval.tasks: {url} has no {' or '.join(sorted(missing))} "
                             f"split to evaluate on (its splits: {sorted(splits)})")


def _task_name(url: str, cfg: Config) -> str:
    """task.json's name (``cola-ray tasks prepare``), else the folder's."""
    import json

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
        self.tasks = [load_task(url.strip(), cfg) for url in cfg.eval.tasks.split(",") if url.strip()]
        log.info("online evaluation: %s loaded in %.1fs", ", ".join(
            f"{t.name} ({len(t.label)} clips, {len(t.classes)} classes)" for t in self.tasks), time.monotonic() - t0)

    def due(self, step: int) -> bool:
        return bool(self.cfg.eval.every_steps) and step % self.cfg.eval.every_steps == 0

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
        t0, out = time.monotonic(), {}
        for task in self.tasks:
            h = clip_embeddings(encoder, task, self.device)
            train = np.flatnonzero((task.split == "train") & (task.label >= 0))
            test = np.flatnonzero(task.split == self.cfg.eval.split)
            y = np.where(task.label >= 0, task.label, len(task.classes))  # unknown: never predicted
            out[f"eval/{task.name}/accuracy"] = probe_accuracy(h, y, train, test, len(task.classes),
                                                               self.cfg.eval.probe_steps, self.cfg.train.seed)
        out["eval/seconds"] = time.monotonic() - t0
        return out
