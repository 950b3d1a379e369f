"""Frozen embeddings of a labelled task: shards -> segments -> encoder -> parquet.

The paper's downstream evaluation (authors' ``cola/supervised.py``) cuts every clip into
non-overlapping 960 ms segments, L2-normalises each one, and embeds it with the frozen
encoder f (BatchNorm in inference mode). This module computes that grid once per
encoder and task, with Ray Data batch inference::

    shard urls --flat_map(decode_segments, Ray tasks)--> one row per segment
        {"clip", "segment", "start", "label", "split", "wave" (S,)}
        --map_batches(EmbedSegments, actor pool: 1 GPU or a few CPUs each)--> + "h" (D,)
        --> the driver --> OUT/embeddings.parquet + OUT/embeddings.json

The linear probe trains on one random segment of this grid per clip per epoch (the
paper's random crops) and evaluates by averaging logits over all of a clip's segments.

The last, partial segment. Padding it with silence (as one reading of the issue asks)
and averaging its logits like the others costs 9-17 points of clip accuracy on real
1-4 s clips (up to 31 on speaker id; see ``original-code-notes.md``, "Downstream"). So
by default (``remainder="end"``) the last segment is aligned to the clip's END: it
overlaps the one before it but holds only real audio. ``"drop"`` discards the remainder,
``"pad"`` zero-pads it (kept for comparison only). A clip shorter than one segment is
one segment, zero-padded and centred, as in pre-training.

    path = embed("runs/cola-1/checkpoint_000010000", "shards/speech-commands", "emb/sc")
    emb = load_embeddings(path)     # {"h": (N, D) float32, "clip": (N,), "label_index": (N,), ...}
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import ray

from cola_ray.data import pipeline, shards, storage
from cola_ray.data.audio import REMAINDERS, split_segments  # noqa: F401  (this module's public names before)
from cola_ray.train import cluster, progress, tracking
from cola_ray.data.pipeline import SampleCounter
from cola_ray.data.tasks import TASK_FILE

FORMAT = "cola-ray-embeddings/1"
EMBEDDINGS_FILE = "embeddings.parquet"
META_FILE = "embeddings.json"


# ---- Ray Data stages -----------------------------------------------------------------

def decode_segments(row: dict[str, Any], cfg: dict[str, Any], counter: Any | None = None) -> Iterator[dict[str, Any]]:
    """One shard -> one row per segment of every good clip (a Ray Data task).

    Bad samples are skipped and counted by reason in ``counter`` (the pre-training
    :class:`~cola_ray.data.pipeline.SampleCounter`), an unreadable shard once by name.
    """
    url = row["shard"]
    tally = pipeline.ShardTally(os.path.basename(url))
    try:
        for key, meta, wave in pipeline.decoded_clips(url, cfg["sample_rate"], tally,
                                                      endpoint_url=cfg["endpoint_url"], region=cfg["region"]):
            segments, starts = split_segments(wave, cfg["segment_samples"], cfg["remainder"])
            for i, (segment, start) in enumerate(zip(segments, starts)):
                yield {
                    "clip": key,
                    "segment": i,
                    "start": int(start),
                    "label": str(meta.get("label", "")),
                    "split": str(meta.get("split", "")),
                    "wave": segment,
                }
            tally.good += 1
    finally:
        tally.report(counter)


class EmbedSegments:
    """Actor of the batch-inference pool: segments (B, S) -> ``h`` (B, D), encoder frozen."""

    def __init__(self, encoder_ref: str, tracking_uri: str, use_gpu: bool) -> None:
        import torch

        from cola_ray.downstream.encoders import resolve_encoder

        self.device = torch.device("cuda" if use_gpu else "cpu")
        encoder, _ = resolve_encoder(encoder_ref, tracking_uri=tracking_uri)
        # eval(): BatchNorm in inference mode and no stochastic depth, as the authors' probe.
        self.encoder = encoder.eval().requires_grad_(False).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        wave = torch.from_numpy(np.array(batch["wave"], dtype=np.float32))  # (B, S); a writable copy
        with torch.inference_mode():
            h = self.encoder(wave.to(self.device)).float().cpu().numpy()  # (B, D)
        out = {k: v for k, v in batch.items() if k != "wave"}
        out["h"] = h
        return out


# ---- driver --------------------------------------------------------------------------

def embed(
    encoder_ref: str,
    data: str,
    out: str | Path,
    *,
    batch_size: int = 64,
    segment_samples: int = 15600,
    remainder: str = "end",
    use_gpu: bool = False,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    decode_num_cpus: float = 0.5,
    sample_rate: int = 16000,
    tracking_uri: str = "",
    endpoint_url: str = "",
    region: str = "",
    ray_address: str = "",
) -> str:
    """Embed every segment of every clip in the shards at ``data``; return the folder ``out``.

    ``encoder_ref``: a checkpoint folder, export folder, MLflow run id, ``models:/...`` or
    ``random:<timm-name>`` (:func:`cola_ray.downstream.encoders.resolve_encoder`). Inference runs in
    ``num_actors`` Ray actors, each holding one encoder: one GPU each with ``use_gpu``,
    else ``cpus_per_actor`` CPUs (fractions allowed). Class indices follow
    ``<data>/task.json``'s ``classes`` when there is one, else the sorted labels of the
    train split. ``out`` gets ``embeddings.parquet`` (one row per segment) and, written
    last so that its presence means complete, ``embeddings.json``.
    """
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    urls = shards.shard_urls(str(data), endpoint_url, region)  # a missing path fails before Ray starts
    if not urls:
        raise FileNotFoundError(f"no *.tar shards found at {data!r}")
    task = read_task(str(data), endpoint_url, region)
    uri = tracking.resolve_tracking_uri(tracking_uri)  # absolute: actors run elsewhere
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the folder counts as finished again only at the end

    cluster.connect(ray_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.monotonic()
    counter = SampleCounter.remote()
    cfg = {"sample_rate": sample_rate, "segment_samples": segment_samples, "remainder": remainder,
           "endpoint_url": endpoint_url, "region": region}
    if use_gpu:
        resources: dict[str, Any] = {"num_gpus": 1}
    else:
        resources = {"num_cpus": cpus_per_actor}
    ds = (
        ray.data.from_items([{"shard": u} for u in urls], override_num_blocks=len(urls))
        .flat_map(decode_segments, fn_kwargs={"cfg": cfg, "counter": counter}, num_cpus=decode_num_cpus)
        .map_batches(
            EmbedSegments,
            fn_constructor_kwargs={"encoder_ref": encoder_ref, "tracking_uri": uri, "use_gpu": use_gpu},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            **resources,
        )
    )
    columns: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    done = 0
    with progress.shown(unit="segment", plain_every_s=30) as board:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k, v in batch.items():
                columns[k].append(v)
            done += len(batch["h"])
            progress.post(board, {"step": done, "per_second": done / max(time.monotonic() - started, 1e-9)})
    counts = ray.get(counter.snapshot.remote())
    if not columns:
        raise ValueError(f"no usable clip in {data!r}: bad samples by reason {counts['bad']}")
    rows = {k: np.concatenate(v) for k, v in columns.items()}

    classes = task_classes(task) or _train_classes(rows["label"], rows["split"])
    index = {c: i for i, c in enumerate(classes)}
    rows["label_index"] = np.array([index.get(str(lab), -1) for lab in rows["label"]], dtype=np.int64)
    _write_parquet(out / EMBEDDINGS_FILE, rows)
    meta = {
        "format": FORMAT,
        "encoder": encoder_ref,
        "data": str(data),
        "task": task.get("task") or task_name(str(data)),
        "classes": classes,
        "segment_samples": segment_samples,
        "remainder": remainder,
        "sample_rate": sample_rate,
        "dim": int(rows["h"].shape[1]),
        "clips": int(len(np.unique(rows["clip"]))),
        "segments": int(rows["h"].shape[0]),
        "bad_samples": counts["bad"],
        "bad_shards": counts["bad_shards"],
        "seconds": round(time.monotonic() - started, 2),
    }
    _atomic_write(out / META_FILE, json.dumps(meta, indent=1).encode("utf-8"))
    return str(out)


def read_task(data: str, endpoint_url: str = "", region: str = "") -> dict[str, Any]:
    """``<data>/task.json`` ({"task", "classes", ...}) if the task has one, else {}."""
    path = storage.join(data, TASK_FILE)
    if not storage.exists(path, endpoint_url, region):
        return {}
    return json.loads(storage.read_bytes(path, endpoint_url, region).decode("utf-8"))


def task_classes(task: Mapping[str, Any]) -> list[str]:
    """The class labels of a task.json in index order ([] if it lists none).

    :func:`cola_ray.data.tasks.prepare_task` writes ``[{"index", "label", ...}, ...]``; a plain
    list of labels is taken as is.
    """
    entries = task.get("classes") or []
    if entries and isinstance(entries[0], Mapping):
        return [str(e["label"]) for e in sorted(entries, key=lambda e: int(e["index"]))]
    return [str(e) for e in entries]


def task_name(data: str) -> str:
    """A task's name when task.json gives none: the last component of its path."""
    return os.path.basename(str(data).rstrip("/")) or str(data)


def _train_classes(labels: np.ndarray, splits: np.ndarray) -> list[str]:
    train = {str(lab) for lab, s in zip(labels, splits) if s == "train" and lab != ""}
    if not train:  # an unsplit task: every label there is
        train = {str(lab) for lab in labels if lab != ""}
    return sorted(train)


def _write_parquet(path: Path, rows: Mapping[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    h = np.ascontiguousarray(rows["h"], dtype=np.float32)
    table = pa.table({
        "clip": pa.array([str(c) for c in rows["clip"]], pa.string()),
        "segment": pa.array(rows["segment"], pa.int32()),
        "start": pa.array(rows["start"], pa.int64()),
        "label": pa.array([str(c) for c in rows["label"]], pa.string()),
        "label_index": pa.array(rows["label_index"], pa.int64()),
        "split": pa.array([str(c) for c in rows["split"]], pa.string()),
        "h": pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), h.shape[1]),
    })
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- loading -------------------------------------------------------------------------

def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``embeddings.json`` of a finished :func:`embed` at ``path``, or None."""
    meta = Path(path) / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


def load_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """The segments of :func:`embed`'s folder as numpy arrays, sorted by (clip, segment).

    ``h`` (N, D) float32; ``clip`` (N,) str and ``clip_index`` (N,) int64 (0..clips-1);
    ``segment``, ``start``; ``label`` (N,) str and ``label_index`` (N,) int64 (-1: not one
    of the classes); ``split`` (N,) str; ``classes`` (C,) str, index order.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"no finished embeddings at {path} (no {META_FILE})")
    table = pq.read_table(path / EMBEDDINGS_FILE)
    dim = int(meta["dim"])
    h = table.column("h").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, dim)
    cols = {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in ("clip", "segment", "start", "label", "label_index", "split")}
    order = np.lexsort((cols["segment"], cols["clip"]))
    emb = {k: np.asarray(v)[order] for k, v in cols.items()}
    emb["clip"] = emb["clip"].astype(str)
    emb["label"] = emb["label"].astype(str)
    emb["split"] = emb["split"].astype(str)
    emb["h"] = h[order]
    _, emb["clip_index"] = np.unique(emb["clip"], return_inverse=True)
    emb["classes"] = np.asarray(meta["classes"], dtype=str)
    return emb
