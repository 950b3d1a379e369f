"""Linear probe on frozen embeddings, evaluated the paper's way, tracked in MLflow.

Protocol (authors' ``cola/supervised.py``; paper section 4): ``g`` is discarded and a
linear layer sits on the encoder's ``h``.

- Train: every epoch, ONE random segment of every train clip (the paper's random 960 ms
  crops, taken from the precomputed segment grid of :mod:`cola_ray.downstream.embed`), shuffled,
  cross-entropy, Adam lr 1e-3, batch 64, 100 epochs. ``weight_decay`` is decoupled
  (AdamW); at 0, the default, it is exactly the authors' Adam.
- Evaluate (clip level): the layer's LOGITS are averaged over all of a clip's segments
  and the argmax is the clip's prediction. Averaging logits is not averaging
  probabilities: one confident segment weighs more (see tests/test_probe.py).

``train_probe`` and ``evaluate`` are pure torch + numpy, so they run inside Ray Tune
trials and in tests without Ray. :func:`probe` is the whole stage for one encoder and
one task: embeddings (computed once, cached), train, evaluate, one MLflow run::

    result = probe("runs/cola-1/checkpoint_000010000", "tasks/speech-commands")
    result.test_accuracy, result.run_id
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cola_ray.downstream.tags import (BASELINE_TAG, BASELINES, DEFAULT_EXPERIMENT, ENCODER_TAG,  # noqa: F401
                                      KIND_TAG, TASK_TAG)


# ---- evaluation: clip level, logits averaged ---------------------------------------------

def clip_logits(logits: np.ndarray, clip_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment logits (N, C) -> ``(clips (K,), mean logits (K, C))`` over each clip's segments."""
    clips, inverse = np.unique(clip_index, return_inverse=True)
    sums = np.zeros((clips.shape[0], logits.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, logits)
    counts = np.bincount(inverse, minlength=clips.shape[0])
    return clips, sums / counts[:, None]


def evaluate(layer: nn.Module, emb: Mapping[str, np.ndarray], split: str) -> dict[str, Any]:
    """Clip-level accuracy of ``layer`` on ``split``: average the logits of each clip's segments.

    Returns ``accuracy``, ``loss`` (cross-entropy of the averaged logits), ``per_class``
    ({class: accuracy over its clips}, classes without clips left out), ``confusion``
    ((C, C) int64, rows = true class, columns = predicted) and ``n_clips``. Segments whose
    label is not one of the classes (``label_index`` -1) are left out.
    """
    classes = [str(c) for c in emb["classes"]]
    n = len(classes)
    y = np.asarray(emb["label_index"])
    rows = np.flatnonzero((np.asarray(emb["split"]) == split) & (y >= 0))
    if rows.size == 0:
        return {"accuracy": math.nan, "loss": math.nan, "per_class": {},
                "confusion": np.zeros((n, n), np.int64), "n_clips": 0}
    h = torch.from_numpy(np.asarray(emb["h"])[rows].astype(np.float32))  # fancy index: a writable copy
    layer.eval()
    with torch.no_grad():
        logits = layer(h).double().numpy()  # (R, C)
    _, inverse = np.unique(_clip_index(emb)[rows], return_inverse=True)
    _, mean = clip_logits(logits, inverse)  # (K, C)
    truth = np.zeros(mean.shape[0], np.int64)
    truth[inverse] = y[rows]
    pred = mean.argmax(axis=1)
    log_probs = mean - np.logaddexp.reduce(mean, axis=1, keepdims=True)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (truth, pred), 1)
    per_class = {classes[c]: float(confusion[c, c] / confusion[c].sum()) for c in range(n) if confusion[c].sum()}
    return {
        "accuracy": float(np.mean(pred == truth)),
        "loss": float(-np.mean(log_probs[np.arange(truth.shape[0]), truth])),
        "per_class": per_class,
        "confusion": confusion,
        "n_clips": int(mean.shape[0]),
    }


def _clip_index(emb: Mapping[str, np.ndarray]) -> np.ndarray:
    if "clip_index" in emb:
        return np.asarray(emb["clip_index"])
    return np.unique(np.asarray(emb["clip"]), return_inverse=True)[1]


POOLINGS = ("logits", "mean")
"""How a clip's segments become one prediction: ``logits`` (the paper: train on random
segments, average the layer's logits over a clip's segments) or ``mean`` (average the
segments' embeddings into one per clip, train and predict on those)."""


def pool(emb: Mapping[str, np.ndarray], pooling: str = "logits") -> dict[str, np.ndarray]:
    """``emb`` as the probe sees it under ``pooling``: unchanged for ``logits``; for ``mean``,
    one row per clip (N -> K): ``h`` the mean of its segments' (K, D), the other per-segment
    fields those of its first segment (``segment`` 0), ``classes`` unchanged."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "logits":
        return dict(emb)
    clip = _clip_index(emb)
    clips, first, inverse = np.unique(clip, return_index=True, return_inverse=True)
    h = np.asarray(emb["h"], dtype=np.float64)
    sums = np.zeros((clips.shape[0], h.shape[1]))
    np.add.at(sums, inverse, h)
    out = {k: (v if k == "classes" else np.asarray(v)[first]) for k, v in emb.items()}
    out["h"] = (sums / np.bincount(inverse)[:, None]).astype(np.float32)
    out["clip_index"] = clips
    if "segment" in out:
        out["segment"] = np.zeros_like(out["segment"])
    return out


# ---- training ----------------------------------------------------------------------------

def train_probe(
    emb: Mapping[str, np.ndarray],
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    epochs: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: Callable[[dict[str, float]], Any] | None = None,
    val_split: str = "validation",
    standardize: bool = False,
) -> tuple[nn.Linear, list[dict[str, float]]]:
    """Train ``Linear(D, C)`` on one random segment per train clip per epoch.

    ``emb`` is :func:`cola_ray.downstream.embed.load_embeddings`' dict (arrays may be read-only, as
    they arrive from Ray's object store). Every epoch's record ``{"epoch", "train_loss",
    "train_accuracy"}`` (segment level, on that epoch's crops), plus ``val_accuracy`` and
    ``val_loss`` (clip level) when ``val_split`` has labelled clips, goes to ``on_epoch``
    and into the returned history. Same ``seed`` and data -> same layer.

    ``standardize``: train on embeddings z-scored with the train split's per-dimension mean
    and standard deviation (as scikit-learn's ``StandardScaler`` before a logistic
    regression), then fold the statistics into the returned layer, so it still takes raw
    embeddings. Off: the paper's protocol.
    """
    y = np.asarray(emb["label_index"])
    split = np.asarray(emb["split"])
    train = np.flatnonzero((split == "train") & (y >= 0))
    if train.size == 0:
        raise ValueError("no labelled segment in the train split: nothing to train the probe on")
    classes = list(emb["classes"])
    h = torch.from_numpy(np.array(emb["h"], dtype=np.float32))  # a writable copy, (N, D)
    mean, std = torch.zeros(h.shape[1]), torch.ones(h.shape[1])
    if standardize:
        mean, std = h[train].mean(0), h[train].std(0).clamp_min(1e-6)
        h = (h - mean) / std
    target = torch.from_numpy(y.astype(np.int64))
    # The segments of each train clip, contiguous: clip k owns order[first[k] : first[k] + count[k]].
    clip = _clip_index(emb)
    order = train[np.argsort(clip[train], kind="stable")]
    _, first, count = np.unique(clip[order], return_index=True, return_counts=True)
    has_val = bool(np.any((split == val_split) & (y >= 0)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(h.shape[1], len(classes))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        picked = order[first + (rng.random(first.shape[0]) * count).astype(np.int64)]  # one segment per clip
        picked = torch.from_numpy(picked[rng.permutation(picked.shape[0])])
        layer.train()
        loss_sum, correct = 0.0, 0
        for batch in picked.split(batch_size):
            logits = layer(h[batch])
            loss = F.cross_entropy(logits, target[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * batch.shape[0]
            correct += int((logits.argmax(1) == target[batch]).sum())
        record = {"epoch": epoch, "train_loss": loss_sum / picked.shape[0],
                  "train_accuracy": correct / picked.shape[0]}
        if has_val:
            result = evaluate(_fold(layer, mean, std) if standardize else layer, emb, val_split)
            record["val_accuracy"], record["val_loss"] = result["accuracy"], result["loss"]
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return (_fold(layer, mean, std) if standardize else layer).eval(), history


def _fold(layer: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """``layer`` on ``(h - mean) / std`` -> the same map as one ``Linear`` on ``h`` (D,)."""
    out = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        out.weight.copy_(layer.weight / std)
        out.bias.copy_(layer.bias - (layer.weight * (mean / std)).sum(1))
    return out


# ---- embeddings, computed once per encoder and task --------------------------------------

def default_cache_dir() -> Path:
    return Path(os.environ.get("COLA_RAY_CACHE") or Path.home() / ".cache" / "cola-ray") / "embeddings"


def cache_key(encoder_ref: str, task: str, **options: Any) -> str:
    """A folder name for (encoder, task, segmenting options); local paths count as absolute."""
    ref = os.path.abspath(encoder_ref) if os.path.exists(encoder_ref) else encoder_ref
    where = os.path.abspath(task) if "://" not in str(task) else str(task)
    digest = hashlib.sha256(json.dumps([ref, where, sorted(options.items())]).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{os.path.basename(where.rstrip('/'))}-{os.path.basename(ref.rstrip('/'))}")
    return f"{readable[:80]}-{digest}"


def cached_embeddings(
    encoder_ref: str,
    task: str,
    *,
    cache_dir: str | Path = "",
    refresh: bool = False,
    segment_samples: int = 15600,
    remainder: str = "end",
    **embed_options: Any,
) -> str:
    """The embeddings folder of (encoder, task), computed with :func:`cola_ray.downstream.embed.embed` if absent.

    Keyed by the encoder ref, the task path and the segmenting options, under
    ``cache_dir`` (default ``$COLA_RAY_CACHE/embeddings`` or ``~/.cache/cola-ray/embeddings``).
    A ref whose weights change in place (a checkpoint folder overwritten) needs ``refresh``.
    """
    from cola_ray.downstream import embed

    folder = Path(cache_dir or default_cache_dir()) / cache_key(
        encoder_ref, task, segment_samples=segment_samples, remainder=remainder
    )
    if not refresh and embed.read_meta(folder) is not None:
        return str(folder)
    return embed.embed(encoder_ref, task, folder, segment_samples=segment_samples, remainder=remainder,
                       **embed_options)


# ---- MLflow ---------------------------------------------------------------------------

def open_tracking(tracking_uri: str = "") -> tuple[str, Any]:
    """``(uri, MlflowClient)``; a local sqlite store's folder is created if missing."""
    from mlflow.tracking import MlflowClient

    from cola_ray.train import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri, MlflowClient(tracking_uri=uri)


def default_baseline(encoder_ref: str) -> str:
    """``random init`` for ``random:<model>``, ``log-mel`` for ``logmel``, else ``COLA frozen``
    (a frozen pre-trained encoder)."""
    if encoder_ref == "logmel":
        return "log-mel"
    return "random init" if encoder_ref.startswith("random:") else "COLA frozen"


def check_baseline(baseline: str) -> str:
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    return baseline


def run_tags(kind: str, encoder_ref: str, task_name: str, baseline: str, embeddings: str,
             lineage: Mapping[str, str] | None = None) -> dict[str, str]:
    """A probe or sweep run's tags; ``lineage`` is :meth:`cola_ray.downstream.encoders.Lineage.tags`."""
    return {KIND_TAG: kind, ENCODER_TAG: encoder_ref, TASK_TAG: task_name, BASELINE_TAG: baseline,
            "cola_ray.embeddings": embeddings, **dict(lineage or {})}


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, ``_-. /`` in names; anything else in a class name becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_history(client: Any, run_id: str, history: list[Mapping[str, float]]) -> None:
    """Per-epoch curves (step = epoch), in batches."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(rec["epoch"])) for rec in history for k, v in rec.items() if k != "epoch"]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_evaluation(client: Any, run_id: str, result: Mapping[str, Any], classes: list[str], prefix: str) -> None:
    """``<prefix>_accuracy``, ``<prefix>_loss``, ``<prefix>_accuracy/<class>``, and the confusion
    matrix as ``evaluation/confusion_<prefix>.csv`` (always) and ``.png`` (with matplotlib)."""
    metrics = {f"{prefix}_accuracy": result["accuracy"], f"{prefix}_loss": result["loss"],
               f"{prefix}_clips": result["n_clips"]}
    metrics.update({metric_name(f"{prefix}_accuracy/{c}"): a for c, a in result["per_class"].items()})
    log_metrics(client, run_id, {k: v for k, v in metrics.items() if not math.isnan(v)})
    with tempfile.TemporaryDirectory(prefix="cola-eval-") as tmp:
        confusion = result["confusion"]
        write_confusion_csv(confusion, classes, Path(tmp, f"confusion_{prefix}.csv"))
        plot_confusion(confusion, classes, Path(tmp, f"confusion_{prefix}.png"),
                       title=f"{prefix}: clip accuracy {result['accuracy']:.1%}")
        client.log_artifacts(run_id, tmp, "evaluation")


def write_confusion_csv(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion):
            writer.writerow([name, *(int(v) for v in row)])


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str = "") -> bool:
    """A PNG of the confusion matrix; False (and nothing written) without matplotlib."""
    if not matplotlib_available():
        return False
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = confusion.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if confusion[i, j] > peak / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def save_layer(layer: nn.Linear, classes: list[str], folder: Path) -> None:
    """``probe.safetensors`` (weight (C, D), bias (C,)) with the class order in its metadata."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in layer.state_dict().items()}
    save_file(tensors, str(folder / "probe.safetensors"), metadata={"classes": json.dumps(classes)})


# ---- the stage ----------------------------------------------------------------------------

@dataclass
class ProbeResult:
    run_id: str
    val_accuracy: float
    test_accuracy: float
    per_class: dict[str, float]
    embeddings: str
    history: list[dict[str, float]] = field(default_factory=list)


def probe(
    encoder_ref: str,
    task: str,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    epochs: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    standardize: bool = False,
    pooling: str = "logits",
    baseline: str = "",
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str = "",
    run_name: str = "",
    cache_dir: str | Path = "",
    refresh: bool = False,
    use_gpu: bool = False,
    embed_options: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """Embed (cached), train the probe, evaluate validation and test; one MLflow run.

    The run is tagged ``cola_ray.task`` (task.json's name, else the folder's) and
    ``cola_ray.baseline`` (default: :func:`default_baseline`), which is what
    :func:`cola_ray.downstream.report.report` builds the table from. Logged: params, per-epoch
    curves, ``val_accuracy``, ``test_accuracy``, per-class accuracies, confusion matrices,
    and the layer. ``standardize`` and ``pooling`` (:data:`POOLINGS`) are protocol options,
    the same for every encoder; the defaults are the paper's.
    """
    from cola_ray.downstream import embed, notes
    from cola_ray.downstream.encoders import lineage
    from cola_ray.train import tracking

    baseline = check_baseline(baseline or default_baseline(encoder_ref))
    measured = lineage(encoder_ref, tracking_uri=tracking_uri)
    path = cached_embeddings(encoder_ref, task, cache_dir=cache_dir, refresh=refresh, use_gpu=use_gpu,
                             tracking_uri=tracking_uri, **dict(embed_options or {}))
    emb = pool(embed.load_embeddings(path), pooling)
    meta = embed.read_meta(path) or {}
    name = meta.get("task") or embed.task_name(task)
    classes = [str(c) for c in emb["classes"]]

    uri, client = open_tracking(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment, uri)
    run = client.create_run(exp_id, run_name=run_name or f"probe-{name}-{baseline.replace(' ', '-')}",
                            tags=run_tags("probe", encoder_ref, name, baseline, path, measured.tags()))
    run_id = run.info.run_id
    status = "FAILED"
    try:
        log_params(client, run_id, {
            "encoder": encoder_ref, "task": task, "lr": lr, "weight_decay": weight_decay, "epochs": epochs,
            "batch_size": batch_size, "seed": seed, "standardize": standardize, "pooling": pooling,
            **split_counts(emb),
            **{k: meta.get(k) for k in ("segment_samples", "remainder", "dim")}, "classes": len(classes),
        })
        layer, history = train_probe(emb, lr=lr, weight_decay=weight_decay, epochs=epochs, standardize=standardize,
                                     batch_size=batch_size, seed=seed)
        log_history(client, run_id, history)
        val = evaluate(layer, emb, "validation")
        test = evaluate(layer, emb, "test")
        log_evaluation(client, run_id, val, classes, "val")
        log_evaluation(client, run_id, test, classes, "test")
        with tempfile.TemporaryDirectory(prefix="cola-probe-") as tmp:
            save_layer(layer, classes, Path(tmp))
            client.log_artifacts(run_id, tmp, "probe")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
        notes.note_finished(client, run_id)
    return ProbeResult(run_id, val["accuracy"], test["accuracy"], test["per_class"], path, history)


def split_counts(emb: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Labelled clips per split: ``{"train_clips": ..., "validation_clips": ..., "test_clips": ...}``."""
    y = np.asarray(emb["label_index"])
    clip = _clip_index(emb)
    split = np.asarray(emb["split"])
    return {f"{s}_clips": int(np.unique(clip[(split == s) & (y >= 0)]).shape[0])
            for s in ("train", "validation", "test")}
