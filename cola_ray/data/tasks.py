"""Downstream tasks: a dataset in its native layout -> labelled shards with train / validation / test.

::

    items = load_task("speech_commands_v1", "/data/speech_commands_v0.01")  # [Item(path, label, split), ...]
    summary = prepare_task("speech_commands_v1", "/data/speech_commands_v0.01", "shards/spc1")

An adapter reads one dataset's layout and split files into :class:`Item` s; where the
dataset has no official split, items come back with ``split=""`` and
:func:`assign_splits` cuts them 80/10/10 per class (seeded); where it has train / test but
no validation, validation is carved out of train (10 %, per class, seeded). Items that
share a ``group`` (a speaker, a recording location) always land in the same split.
:func:`validate` then refuses what a downstream run would trip on later. :func:`prepare_task`
writes the items with the pre-training shard writer (``<key>.flac`` + ``<key>.json``
holding ``label`` and ``split``) and ``OUT/task.json``, the label set with its indices.

Layouts (SRC is the folder as unpacked; shard ``source`` fields are relative to it):

======================  ==================================================================
speech_commands_v1      ``<word>/<id>_nohash_<n>.wav``, ``validation_list.txt``,
                        ``testing_list.txt``, ``_background_noise_/*.wav``. 12 classes: the
                        10 words, ``_unknown_`` (every other word, all kept) and
                        ``_silence_`` (each background-noise file cut into whole 1 s
                        pieces, the pieces split 80/10/10).
speech_commands_v2      same layout; 35 classes, one per word; background noise unused.
librispeech_100h        ``[LibriSpeech/]train-clean-100/<speaker>/<chapter>/*.flac``;
                        label = speaker; utterances split 80/10/10 per speaker.
voxceleb1               ``iden_split.txt`` (``<1|2|3> idXXXXX/<video>/<utt>.wav``, 1 train,
                        2 validation, 3 test) in SRC or ``SRC/meta/``; audio under
                        ``SRC/wav/`` if that folder exists, else under SRC.
tut_urban_2018          ``meta.csv`` (tab-separated ``filename scene_label identifier
                        source_label``, header row), ``evaluation_setup/fold1_train.csv``
                        and ``fold1_evaluate.csv`` (``filename scene_label``), audio
                        ``audio/*.wav``. evaluate -> test; validation carved from train
                        grouped by ``identifier`` (recording location).
bird_detection          one or more ``*.csv`` in SRC with columns ``itemid,datasetid,
                        hasbird`` (the DCASE 2018 task 3 metadata files) and
                        ``<itemid>.wav`` anywhere under SRC (e.g. ``ff1010bird/wav/``);
                        labels ``bird`` / ``no_bird``; split 80/10/10.
musan                   ``[musan/]{music,speech,noise}/**/*.wav``; split 80/10/10.
nsynth                  ``nsynth-{train,valid,test}/examples.json`` + ``audio/<note>.wav``;
                        label ``instrument_family_str``.
voxforge                ``<language>/<session>/wav/*.wav`` (any audio under the session
                        folder, e.g. ``flac/``), sessions named ``<user>-<date>-<id>`` as
                        in the Voxforge archives; label = language folder; split 80/10/10
                        by speaker: a named ``<user>`` is one speaker across sessions,
                        each ``anonymous-*`` session its own.
folder                  ``<class>/**/<audio>``, or ``{train,validation,test}/<class>/...``
                        (``val``/``valid``/``dev`` and ``eval``/``testing`` accepted).
csv                     SRC is a CSV ``path,label[,split]`` (or a folder holding
                        ``labels.csv``); paths relative to the CSV's folder.
======================  ==================================================================
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from cola_ray.data import shards, storage

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

SPC_V1_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "_unknown_", "_silence_"
BACKGROUND_NOISE = "_background_noise_"
SILENCE_SECONDS = 1.0
MUSAN_CLASSES = ("music", "noise", "speech")
NSYNTH_FAMILIES = ("bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed",
                   "string", "synth_lead", "vocal")
NSYNTH_SPLITS = (("nsynth-train", "train"), ("nsynth-valid", "validation"), ("nsynth-test", "test"))
BIRD_LABELS = {"0": "no_bird", "1": "bird"}


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


# ---- the pipeline ----------------------------------------------------------------------

def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


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
        "task": task.name,
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


# ---- adapters: the paper's nine tasks --------------------------------------------------

def _speech_commands(src: Path, *, v1: bool) -> list[Item]:
    validation = _read_list(src / "validation_list.txt")
    test = _read_list(src / "testing_list.txt")
    words = [d.name for d in _subdirs(src) if d.name != BACKGROUND_NOISE]
    items, found = [], set()
    for word in words:
        label = word if not v1 or word in SPC_V1_WORDS else UNKNOWN
        for rel in _audio_under(src, src / word, f"word {word!r}"):
            split = "validation" if rel in validation else "test" if rel in test else "train"
            items.append(Item(rel, label, split))
            found.add(rel)
    for listed, name in ((validation, "validation_list.txt"), (test, "testing_list.txt")):
        missing = sorted(listed - found)
        if missing:
            raise FileNotFoundError(f"{src / name}: lists {len(missing)} missing clip(s), e.g. {missing[0]}")
    if v1:
        present = {it.label for it in items}
        for word in (*SPC_V1_WORDS, UNKNOWN):
            if word not in present:
                raise TaskError(f"{src}: class {word!r} is empty (no clips for it under {src})")
        items += _silence_pieces(src)
    return items


def _silence_pieces(src: Path) -> list[Item]:
    """``_silence_`` items: each background-noise file cut into whole 1 s pieces."""
    import soundfile as sf

    noise = src / BACKGROUND_NOISE
    items = []
    for rel in _audio_under(src, noise, f"class {SILENCE!r} ({BACKGROUND_NOISE})"):
        info = sf.info(str(src / rel))
        for k in range(int(info.frames / info.samplerate / SILENCE_SECONDS)):
            items.append(Item(rel, SILENCE, segment=(k * SILENCE_SECONDS, (k + 1) * SILENCE_SECONDS)))
    if not items:
        raise TaskError(f"{noise}: class {SILENCE!r} is empty (no noise clip of {SILENCE_SECONDS} s or more)")
    return items


def speech_commands_v1(src: Path) -> list[Item]:
    return _speech_commands(src, v1=True)


def speech_commands_v2(src: Path) -> list[Item]:
    return _speech_commands(src, v1=False)


def librispeech_100h(src: Path) -> list[Item]:
    for base in (src, src / "train-clean-100", src / "LibriSpeech" / "train-clean-100"):
        if base.name == "train-clean-100" and base.is_dir():
            break
    else:
        raise FileNotFoundError(f"{src / 'train-clean-100'}: LibriSpeech train-clean-100 folder not found")
    items = []
    for speaker in _subdirs(base):
        items += [Item(rel, speaker.name) for rel in _audio_under(src, speaker, f"speaker {speaker.name!r}")]
    return items


def voxceleb1(src: Path) -> list[Item]:
    split_file = next((p for p in (src / "iden_split.txt", src / "meta" / "iden_split.txt") if p.is_file()),
                      src / "iden_split.txt")
    prefix = "wav/" if (src / "wav").is_dir() else ""
    codes = {"1": "train", "2": "validation", "3": "test"}
    items = []
    for line_no, cells in _read_table(split_file, "split file"):
        cells = cells[0].split() if len(cells) == 1 else cells
        if len(cells) != 2 or cells[0] not in codes:
            raise TaskError(f"{split_file}:{line_no}: expected '<1|2|3> idXXXXX/<video>/<utt>.wav', "
                            f"got {cells}")
        rel = prefix + cells[1]
        if not (src / rel).is_file():
            raise FileNotFoundError(f"{split_file}:{line_no}: {src / rel} not found")
        items.append(Item(rel, cells[1].split("/")[0], codes[cells[0]]))
    return items


def tut_urban_2018(src: Path) -> list[Item]:
    meta_file = src / "meta.csv"
    meta = {}
    for line_no, cells in _read_table(meta_file, "TUT meta file"):
        if len(cells) < 3:
            raise TaskError(f"{meta_file}:{line_no}: expected 'filename scene_label identifier source_label'")
        meta[cells[0]] = (cells[1], cells[2])
    items = []
    for name, split in (("fold1_train.csv", "train"), ("fold1_evaluate.csv", "test")):
        fold = src / "evaluation_setup" / name
        for line_no, cells in _read_table(fold, "split file"):
            rel = cells[0]
            label, location = meta.get(rel, ("", ""))
            if len(cells) > 1 and label and cells[1] != label:
                raise TaskError(f"{fold}:{line_no}: label {cells[1]!r} for {rel}, "
                                f"but {meta_file} says {label!r}")
            label = label or (cells[1] if len(cells) > 1 else "")
            if not label:
                raise TaskError(f"{fold}:{line_no}: no scene label for {rel} here or in {meta_file}")
            if not (src / rel).is_file():
                raise FileNotFoundError(f"{fold}:{line_no}: {src / rel} not found")
            items.append(Item(rel, label, split, group=location))
    return items


def bird_detection(src: Path) -> list[Item]:
    by_stem: dict[str, list[str]] = {}
    for rel in shards.find_audio_files(src):
        by_stem.setdefault(rel.rsplit("/", 1)[-1].rsplit(".", 1)[0], []).append(rel)
    items, tables = [], sorted(src.glob("*.csv"))
    for table in tables:
        reader = csv.DictReader(io.StringIO(table.read_text(encoding="utf-8-sig")))
        if not {"itemid", "hasbird"} <= {(f or "").strip() for f in reader.fieldnames or ()}:
            continue  # another CSV lying around
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            where = f"{table}:{reader.line_num}"
            if row["hasbird"] not in BIRD_LABELS:
                raise TaskError(f"{where}: hasbird must be 0 or 1, got {row['hasbird']!r}")
            found = by_stem.get(row["itemid"], [])
            if len(found) > 1:  # the same itemid in two of the datasets: pick by folder name
                found = [f for f in found if row.get("datasetid") and row["datasetid"] in f.split("/")[0]]
            if len(found) != 1:
                raise FileNotFoundError(f"{where}: {len(found)} audio files named "
                                        f"{row['itemid']}.* under {src}")
            items.append(Item(found[0], BIRD_LABELS[row["hasbird"]]))
    if not items:
        raise FileNotFoundError(f"{src}: no *.csv with columns itemid,datasetid,hasbird "
                                f"(looked at {[t.name for t in tables]})")
    return items


def musan(src: Path) -> list[Item]:
    root = src / "musan" if not (src / "music").is_dir() and (src / "musan").is_dir() else src
    items = []
    for label in MUSAN_CLASSES:
        items += [Item(rel, label) for rel in _audio_under(src, root / label, f"MUSAN class {label!r}")]
    return items


def nsynth(src: Path) -> list[Item]:
    items = []
    for folder, split in NSYNTH_SPLITS:
        examples = _require_file(src / folder / "examples.json", "NSynth split file")
        for note, attrs in sorted(json.loads(examples.read_text(encoding="utf-8")).items()):
            label = attrs.get("instrument_family_str", "")
            rel = f"{folder}/audio/{note}.wav"
            if not (src / rel).is_file():
                raise FileNotFoundError(f"{examples}: {note} -> {src / rel} not found")
            items.append(Item(rel, label, split))
    return items


def voxforge(src: Path) -> list[Item]:
    items = []
    for language in _subdirs(src):
        for rel in _audio_under(src, language, f"language {language.name!r}"):
            parts = rel.split("/")
            if len(parts) <= 2:  # a file right under <language>: a speaker of its own
                speaker = rel
            else:
                user = parts[1].split("-", 1)[0].lower()
                speaker = parts[1] if user == "anonymous" or "-" not in parts[1] else user
            items.append(Item(rel, language.name, group=speaker))
    return items


# ---- adapters: generic -----------------------------------------------------------------

def class_folders(src: Path) -> list[Item]:
    top = _subdirs(src)
    split_of = {d: SPLIT_ALIASES.get(d.name.lower()) for d in top}
    by_split = top and all(split_of.values()) and "train" in split_of.values()
    items = []
    for base in (top if by_split else [src]):
        split = split_of[base] if by_split else ""
        loose = [f for f in sorted(base.iterdir())
                 if f.is_file() and f.suffix[1:].lower() in shards.SOURCE_EXTENSIONS]
        if loose:
            raise TaskError(f"{loose[0]}: audio outside a class folder (expected {base}/<class>/...)")
        for cls in _subdirs(base):
            items += [Item(rel, cls.name, split) for rel in _audio_under(src, cls, f"class {cls.name!r}")]
    return items


def labels_csv(src: Path) -> list[Item]:
    table = src if src.is_file() else _require_file(src / "labels.csv", "labels CSV")
    root = table.parent.resolve()
    items = []
    for line_no, row in enumerate(csv.reader(io.StringIO(table.read_text(encoding="utf-8-sig"))), start=1):
        if not row or not "".join(row).strip():
            continue
        if line_no == 1 and row[0].strip().lower() in ("path", "file", "filename"):
            continue
        if len(row) < 2:
            raise TaskError(f"{table}:{line_no}: expected 'path,label[,split]', got {row!r}")
        path, label = row[0].strip(), row[1].strip()
        split = row[2].strip() if len(row) > 2 else ""
        if split and split.lower() not in SPLIT_ALIASES:
            raise TaskError(f"{table}:{line_no}: unknown split {split!r} (use {', '.join(SPLITS)})")
        if os.path.isabs(path):
            try:
                rel = Path(path).resolve().relative_to(root).as_posix()
            except ValueError:
                raise TaskError(f"{table}:{line_no}: {path} is outside {root}") from None
        else:
            rel = posixpath.normpath(path.replace("\\", "/"))
        if rel.startswith("../"):
            raise TaskError(f"{table}:{line_no}: {path} is outside {root}")
        if not (root / rel).is_file():
            raise FileNotFoundError(f"{table}:{line_no}: {root / rel} not found")
        if not label:
            raise TaskError(f"{table}:{line_no}: empty label for {path}")
        items.append(Item(rel, label, SPLIT_ALIASES.get(split.lower(), "")))
    return items


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("speech_commands_v1", speech_commands_v1, "Speech Commands V1: 10 words + unknown + silence", 12,
         (*SPC_V1_WORDS, UNKNOWN, SILENCE)),
    Task("speech_commands_v2", speech_commands_v2, "Speech Commands V2: 35 words", 35),
    Task("librispeech_100h", librispeech_100h, "LibriSpeech train-clean-100 speaker id", 251),
    Task("voxceleb1", voxceleb1, "VoxCeleb1 speaker identification (iden_split.txt)", 1251),
    Task("tut_urban_2018", tut_urban_2018, "TUT Urban Acoustic Scenes 2018, fold 1", 10),
    Task("bird_detection", bird_detection, "DCASE 2018 bird audio detection", 2,
         tuple(sorted(BIRD_LABELS.values()))),
    Task("musan", musan, "MUSAN music / speech / noise", 3, MUSAN_CLASSES),
    Task("nsynth", nsynth, "NSynth instrument family", 11, NSYNTH_FAMILIES),
    Task("voxforge", voxforge, "Voxforge language id", 6),
    Task("folder", class_folders, "a folder per class (optionally under train/validation/test)"),
    Task("csv", labels_csv, "a CSV of path,label[,split]"),
)}
"""The registry: task name -> :class:`Task` (``TASKS[name].adapter(src) -> [Item]``)."""

PAPER_CLASSES = {name: t.paper_classes for name, t in TASKS.items() if t.paper_classes}
"""Class counts as in the COLA paper, for documentation; not enforced."""


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
