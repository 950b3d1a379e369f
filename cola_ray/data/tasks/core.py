"""What every downstream task is made of: :class:`Item`, :class:`Task`, the seeded
stratified splitter (:func:`assign_splits`), :func:`validate` and the file helpers the
adapters share. See :mod:`cola_ray.data.tasks`."""

from __future__ import annotations

import posixpath
import random
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from cola_ray.data import shards

SPLITS = ("train", "validation", "test")
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
"""How items of a dataset without an official split are divided, per class."""
VALIDATION_FRACTION = 0.1
"""Share of train carved out as validation when a dataset only has train / test."""
TASK_FILE = "task.json"
TASK_FORMAT = "cola-ray-task/1"

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "val": "validation", "valid": "validation", "dev": "validation",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
}


class TaskError(ValueError):
    """A dataset that cannot become a task as it is; the message names the file and label."""


@dataclass(frozen=True)
class Item:
    """One labelled clip of a downstream dataset.

    ``path``: POSIX path relative to the dataset root. ``split``: one of :data:`SPLITS`,
    or ``""`` where the dataset has none (see :func:`assign_splits`). ``group``: items
    with the same group and label never straddle splits (speaker, location); ``""`` = on
    its own. ``segment``: ``(start, stop)`` seconds when the item is a piece of ``path``.
    """

    path: str
    label: str
    split: str = ""
    group: str = ""
    segment: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        """Relative path of the clip in the shards' ``source`` (a piece gets its own name)."""
        if self.segment is None:
            return self.path
        start, stop = (int(round(s * 1000)) for s in self.segment)
        return f"{self.path.rsplit('.', 1)[0]}__{start}-{stop}ms.wav"


@dataclass(frozen=True)
class Task:
    """A registered downstream task: how to read it, and what the paper says about it."""

    name: str
    adapter: Callable[[Path], list[Item]]
    description: str
    paper_classes: int | None = None
    """Class count in the COLA paper (documentation only: tiny replicas have fewer)."""
    classes: tuple[str, ...] | None = None
    """The task's fixed label set; a label outside it is an error."""


# ---- splitting -------------------------------------------------------------------------

def stratified_split(
    labels: Sequence[str], units: Sequence[str], fractions: Mapping[str, float], seed: int
) -> list[str]:
    """The split of each item: per label, shuffled units cut at the cumulative fractions.

    ``units[i]`` names the unit item i moves with (its group, or its own path); the units
    of a label are sorted then shuffled with ``random.Random(f"{seed}:{label}")``, so a
    class's split depends on the seed and that class only, never on input order. Cuts are
    placed so the item counts come closest to ``fractions``; the first split (train) is
    never empty, and with at least as many units as splits none is.
    """
    names = list(fractions)
    weights = [float(fractions[n]) for n in names]
    out = [""] * len(labels)
    by_label: dict[str, dict[str, list[int]]] = {}
    for i, (label, unit) in enumerate(zip(labels, units, strict=True)):
        by_label.setdefault(label, {}).setdefault(unit, []).append(i)
    for label in sorted(by_label):
        members = by_label[label]
        order = sorted(members)
        random.Random(f"{seed}:{label}").shuffle(order)
        cum = [0, *accumulate(len(members[u]) for u in order)]
        bounds = _cut_points(cum, weights)
        for j, name in enumerate(names):
            for unit in order[bounds[j]:bounds[j + 1]]:
                for i in members[unit]:
                    out[i] = name
    return out


def _cut_points(cum: list[int], weights: list[float]) -> list[int]:
    """Unit indices ``[0, b1, ..., k]`` whose cumulative sizes come closest to the weights."""
    k, m, total = len(cum) - 1, len(weights), cum[-1]
    strict = k >= m  # enough units for every split to get one
    bounds, share = [0], 0.0
    for j in range(1, m):
        share += weights[j - 1] / sum(weights)
        lo = bounds[-1] + (1 if strict or j == 1 else 0)  # train always gets a unit
        hi = k - (m - j if strict else 0)  # leave one unit for each split still to come
        bounds.append(min(range(lo, hi + 1), key=lambda b: (abs(cum[b] - share * total), b)))
    return bounds + [k]


def assign_splits(items: Sequence[Item], seed: int = 0) -> list[Item]:
    """Give every item a split: ``""`` -> 80/10/10, and carve validation from train if none.

    Both cuts are stratified by label, keep groups together and are seeded (see
    :func:`stratified_split`). Items that already have a split keep it.
    """
    items = list(items)

    def cut(idx: list[int], fractions: Mapping[str, float]) -> None:
        labels = [items[i].label for i in idx]
        units = [f"group:{items[i].group}" if items[i].group else items[i].name for i in idx]
        splits = stratified_split(labels, units, fractions, seed)
        for i, split in zip(idx, splits):
            items[i] = replace(items[i], split=split)

    todo = [i for i, it in enumerate(items) if not it.split]
    if todo:
        cut(todo, FRACTIONS)
    if not any(it.split == "validation" for it in items):
        train = [i for i, it in enumerate(items) if it.split == "train"]
        cut(train, {"train": 1.0 - VALIDATION_FRACTION, "validation": VALIDATION_FRACTION})
    return items


# ---- checking --------------------------------------------------------------------------

def validate(items: Sequence[Item], task: Task, src: Path) -> None:
    """Refuse items a downstream run could not use; raises :class:`TaskError`.

    Checks: at least one item; split in :data:`SPLITS`; label non-empty and, for tasks with
    a fixed label set, in it; an audio extension; no hidden path component (the shard
    writer skips those); no clip twice; every label of validation / test seen in train.
    """
    if not items:
        raise TaskError(f"{task.name}: no clips found under {src}")
    seen: set[str] = set()
    train_labels = {it.label for it in items if it.split == "train"}
    for it in items:
        where = src / it.path
        if it.split not in SPLITS:
            raise TaskError(f"{where}: split {it.split!r} is not one of {SPLITS}")
        if not it.label:
            raise TaskError(f"{where}: empty label")
        if task.classes is not None and it.label not in task.classes:
            raise TaskError(f"{where}: label {it.label!r} is not one of the {task.name} classes "
                            f"{task.classes}")
        ext = it.name.rpartition(".")[2].lower()
        if ext not in shards.SOURCE_EXTENSIONS:
            raise TaskError(f"{where}: .{ext} is not an audio extension ({sorted(shards.SOURCE_EXTENSIONS)})")
        if any(part.startswith(".") for part in it.name.split("/")):
            raise TaskError(f"{where}: hidden path component (the shard writer skips those)")
        if it.name in seen:
            raise TaskError(f"{where}: listed twice")
        seen.add(it.name)
        if it.label not in train_labels:
            raise TaskError(f"{where}: label {it.label!r} is in {it.split} but never in train")


def class_counts(items: Iterable[Item]) -> dict[str, dict[str, int]]:
    """``{label: {split: n}}`` with labels in class order (sorted) and every split present."""
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        counts.setdefault(it.label, dict.fromkeys(SPLITS, 0))[it.split] += 1
    return {label: counts[label] for label in sorted(counts)}


# ---- reading helpers -------------------------------------------------------------------

def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def _read_list(path: Path) -> set[str]:
    """Non-empty lines of a split list (``word/clip.wav`` per line) as normalised paths."""
    _require_file(path, "split file")
    return {posixpath.normpath(line.strip().replace("\\", "/"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def _read_table(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """``(line_no, cells)`` of a tab-separated file (comma if a line has no tab); no header."""
    _require_file(path, what)
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        cells = [c.strip() for c in (line.split("\t") if "\t" in line else line.split(","))]
        if not rows and cells[0].lower() in ("filename", "path", "file"):
            continue
        rows.append((line_no, cells))
    return rows


def _audio_under(root: Path, folder: Path, what: str) -> list[str]:
    """Audio files under ``folder`` as paths relative to ``root``; empty -> TaskError."""
    files = shards.find_audio_files(folder) if folder.is_dir() else []
    if not files:
        raise TaskError(f"{folder}: {what} has no audio files (empty class)")
    prefix = folder.relative_to(root).as_posix()
    return [f"{prefix}/{f}" if prefix != "." else f for f in files]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
