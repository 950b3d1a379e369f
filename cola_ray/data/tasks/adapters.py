"""One adapter per dataset layout (the paper's nine tasks, a folder per class, a CSV), and
the registry :data:`TASKS`. The layouts are described in :mod:`cola_ray.data.tasks`."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from pathlib import Path

from cola_ray.data import shards
from cola_ray.data.tasks.core import (
    SPLIT_ALIASES,
    SPLITS,
    Item,
    Task,
    TaskError,
    _audio_under,
    _read_list,
    _read_table,
    _require_file,
    _subdirs,
)

SPC_V1_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "_unknown_", "_silence_"
BACKGROUND_NOISE = "_background_noise_"
SILENCE_SECONDS = 1.0
MUSAN_CLASSES = ("music", "noise", "speech")
NSYNTH_FAMILIES = ("bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed",
                   "string", "synth_lead", "vocal")
NSYNTH_SPLITS = (("nsynth-train", "train"), ("nsynth-valid", "validation"), ("nsynth-test", "test"))
BIRD_LABELS = {"0": "no_bird", "1": "bird"}


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


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
