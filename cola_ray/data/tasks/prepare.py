"""A dataset -> a task on disk: :func:`load_task` (adapter, splits, checks),
:func:`prepare_task` (labelled shards + ``task.json``) and :func:`synthetic_task`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from cola_ray.data import shards, storage
from cola_ray.data.tasks.adapters import get_task, labels_csv
from cola_ray.data.tasks.core import SPLITS, TASK_FILE, TASK_FORMAT, Item, assign_splits, class_counts, validate


# ---- the pipeline ----------------------------------------------------------------------

def load_task(name: str, src: str | Path, *, seed: int = 0) -> list[Item]:
    """Read dataset ``src`` as task ``name``: adapter, then splits, then :func:`validate`."""
    task = get_task(name)
    src = Path(src)
    if not (src.is_dir() or (src.is_file() and task.adapter is labels_csv)):
        raise FileNotFoundError(f"dataset folder not found: {src}")
    items = assign_splits(task.adapter(src), seed)
    validate(items, task, _root(src))
    return items


def prepare_task(
    name: str,
    src: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    max_samples: int = 1000,
    progress: bool = True,
    endpoint_url: str = "",
    region: str = "",
) -> dict[str, Any]:
    """Dataset ``src`` -> labelled shards + ``task.json`` at ``out`` (folder or s3://); summary.

    ``build_shards`` packs every audio file under its source folder, so the task's clips
    (and only they) are staged first in a temp folder, under their dataset-relative paths:
    symlinks to the originals, and real files for the pieces cut from longer clips
    (``_silence_``). Shard keys and ``source`` fields therefore follow the dataset's own
    paths, and a re-run with the same inputs resumes / reproduces the same shards.

    ``task.json``: ``{"format", "task", "paper_classes", "seed", "classes": [{"index",
    "label", "train", "validation", "test"}], "splits": {split: n}, "samples",
    "skipped"}``; class indices follow sorted labels, counts are of samples written
    (unreadable files are skipped by the shard writer and counted in ``skipped``).
    """
    task = get_task(name)
    src = Path(src)
    items = load_task(name, src, seed=seed)
    root = _root(src)
    with tempfile.TemporaryDirectory(prefix="cola-task-") as tmp:
        staged = Path(tmp, "src")
        stage_items(items, root, staged)
        labels_csv = Path(tmp, "labels.csv")
        write_labels_csv(items, labels_csv)
        manifest = shards.build_shards(staged, out, labels_csv=labels_csv, max_samples=max_samples,
                                       progress=progress, endpoint_url=endpoint_url, region=region)
    skipped = {s["source"] for s in manifest["skipped"]}
    # The label set is the validated one; the counts are of what the shards hold.
    counts = {label: dict.fromkeys(SPLITS, 0) for label in class_counts(items)}
    for label, written in class_counts(it for it in items if it.name not in skipped).items():
        counts[label] = written
    splits = {s: sum(c[s] for c in counts.values()) for s in SPLITS}
    info = {
        "format": TASK_FORMAT,
        # The generic layouts name no dataset: the task is called after its folder
        # (tables and MLflow tags would otherwise call every such task "csv").
        "task": task.name if task.name not in ("csv", "folder") else _folder_name(out),
        "paper_classes": task.paper_classes,
        "seed": seed,
        "classes": [{"index": i, "label": label, **c} for i, (label, c) in enumerate(counts.items())],
        "splits": splits,
        "samples": sum(splits.values()),
        "skipped": len(skipped),
    }
    storage.write_bytes(storage.join(str(out), TASK_FILE),
                        json.dumps(info, indent=1).encode("utf-8") + b"\n", endpoint_url, region)
    if progress:
        sizes = ", ".join(f"{s} {n}" for s, n in splits.items())
        print(f"{task.name}: {len(counts)} classes; {sizes}; {len(skipped)} skipped", file=sys.stderr)
    return {**info, "out": str(out), "shards": len(manifest["shards"])}


def read_task_info(out: str, endpoint_url: str = "", region: str = "") -> dict[str, Any]:
    """``OUT/task.json`` as written by :func:`prepare_task`."""
    return json.loads(storage.read_bytes(storage.join(str(out), TASK_FILE), endpoint_url, region))


def stage_items(items: Sequence[Item], root: Path, staged: Path) -> None:
    """Lay the items out under ``staged`` by :attr:`Item.name`: symlinks, or cut pieces."""
    import soundfile as sf

    made: set[Path] = set()
    for it in items:
        dest = staged / it.name
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        source = (root / it.path).absolute()
        if it.segment is None:
            try:
                os.symlink(source, dest)
            except OSError:  # no symlinks on this filesystem
                shutil.copyfile(source, dest)
            continue
        rate = sf.info(str(source)).samplerate
        start, stop = (int(round(s * rate)) for s in it.segment)
        wave, rate = sf.read(str(source), start=start, stop=stop, dtype="float32")
        sf.write(str(dest), wave, rate, format="WAV", subtype="FLOAT")


def write_labels_csv(items: Sequence[Item], path: Path) -> None:
    """The ``path,label,split`` CSV that :func:`shards.build_shards` reads."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for it in items:
            writer.writerow([it.name, it.label, it.split])


def _root(src: Path) -> Path:
    """The folder item paths are relative to (the CSV's folder when SRC is a file)."""
    return src if src.is_dir() else src.parent


def synthetic_task(
    out: str | Path,
    *,
    n_clips: int = 120,
    seconds: float = 3.0,
    n_classes: int = 4,
    classes: Sequence[str] = (),
    name: str = "synthetic",
    max_samples: int = 32,
    seed: int = 0,
    clips_dir: str | Path = "",
    endpoint_url: str = "",
    region: str = "",
) -> str:
    """A labelled task made of :mod:`cola_ray.data.synthetic` clips: shards + ``task.json`` at ``out``.

    For smoke runs and tests of the downstream path where no dataset is at hand: classes
    are the synthetic families (``classes`` gives their task.json order; default sorted),
    split about 70/15/15, stratified and seeded. Returns ``out``. A complete build at
    ``out`` is kept (``build_shards`` resumes), so a re-run costs the clip synthesis only.
    The clips are written to ``clips_dir`` and kept there if it is given.
    """
    from cola_ray.data import synthetic

    with tempfile.TemporaryDirectory(prefix="cola-synth-task-") as tmp:
        src = Path(clips_dir or tmp)
        labels_csv = synthetic.make_corpus(src, n_clips=n_clips, seconds=seconds, n_classes=n_classes, seed=seed)
        shards.build_shards(src, out, labels_csv=labels_csv, max_samples=max_samples, progress=False,
                            endpoint_url=endpoint_url, region=region)
        labels = sorted({row.split(",")[1] for row in Path(labels_csv).read_text().splitlines()[1:]})
    order = list(classes) or labels
    if sorted(order) != labels:
        raise ValueError(f"classes {order} are not the synthetic families of this task: {labels}")
    info = {"format": TASK_FORMAT, "task": name, "seed": seed,
            "classes": [{"index": i, "label": label} for i, label in enumerate(order)]}
    storage.write_bytes(storage.join(str(out), TASK_FILE), json.dumps(info, indent=1).encode("utf-8") + b"\n",
                        endpoint_url, region)
    return str(out)


def _folder_name(url: str | Path) -> str:
    """The last part of a folder path or ``s3://`` URL."""
    return str(url).rstrip("/").rsplit("/", 1)[-1]
