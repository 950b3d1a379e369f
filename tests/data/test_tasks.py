"""tasks.py: each adapter on a tiny replica of its dataset's layout, the splitter, the
error rules, and one dataset all the way into verified shards + task.json.

Replicas are written on the fly in tmp_path: a few 0.2 s clips in the right folders,
next to split files in the real formats.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cola_ray.data import shards, tasks
from cola_ray.data.tasks import Item, TaskError, assign_splits, load_task, prepare_task, stratified_split

RATE = 16000


def clip(path: Path, seconds: float = 0.2, seed: int = 0, fmt: str = "WAV") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * RATE)).astype(np.float32)
    sf.write(path, x, RATE, format=fmt, subtype="PCM_16")


def splits_of(items: list[Item]) -> dict[str, str]:
    return {it.name: it.split for it in items}


def counts(items: list[Item], split: str | None = None) -> Counter:
    return Counter(it.label for it in items if split is None or it.split == split)


# ---- replicas --------------------------------------------------------------------------

def speech_commands(root: Path, words: list[str], per_word: int = 3,
                    noise: tuple[float, ...] = (3.5, 2.2)) -> Path:
    """``<word>/<id>_nohash_<n>.wav``; clip 0 of every word in validation, clip 1 in test."""
    val, test = [], []
    for w, word in enumerate(words):
        for n in range(per_word):
            rel = f"{word}/{w:04x}{n:04x}_nohash_0.wav"
            clip(root / rel, seed=w * 100 + n)
            (val if n == 0 else test if n == 1 else []).append(rel)
    for i, seconds in enumerate(noise):
        clip(root / tasks.BACKGROUND_NOISE / f"noise_{i}.wav", seconds, seed=999 + i)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "README.md").write_text("not audio")
    return root


@pytest.fixture
def spc_v1(tmp_path) -> Path:
    return speech_commands(tmp_path / "spc1", [*tasks.SPC_V1_WORDS, "bed", "cat"])


# ---- the splitter ----------------------------------------------------------------------

def test_stratified_split_is_per_class_seeded_and_order_free():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 3 + ["d"]
    units = [f"{label}/{i}" for i, label in enumerate(labels)]
    out = stratified_split(labels, units, tasks.FRACTIONS, seed=0)
    got = Counter(zip(labels, out))
    assert (got["a", "train"], got["a", "validation"], got["a", "test"]) == (40, 5, 5)
    assert (got["b", "train"], got["b", "validation"], got["b", "test"]) == (24, 3, 3)
    assert (got["c", "train"], got["c", "validation"], got["c", "test"]) == (1, 1, 1)  # every split gets one
    assert got["d", "train"] == 1                                                      # a lone item trains
    # Same seed -> same splits, whatever the input order; another seed -> other splits.
    rev = stratified_split(labels[::-1], units[::-1], tasks.FRACTIONS, seed=0)
    assert rev[::-1] == out
    assert stratified_split(labels, units, tasks.FRACTIONS, seed=1) != out
    # A class's split does not move when another class is added.
    more = stratified_split(labels + ["e"] * 10, units + [f"e/{i}" for i in range(10)],
                            tasks.FRACTIONS, seed=0)
    assert more[: len(out)] == out


def test_groups_never_straddle_splits_and_validation_is_carved():
    items = [Item(f"g{g}/{i}.wav", "x", group=f"g{g}") for g in range(12) for i in range(g % 3 + 1)]
    items += [Item(f"t/{i}.wav", "x", "test") for i in range(3)]
    out = assign_splits(items, seed=3)
    by_group: dict[str, set[str]] = {}
    for it in out:
        if it.group:
            by_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in by_group.values())
    assert {it.split for it in out} == set(tasks.SPLITS)
    assert [it.split for it in out[-3:]] == ["test"] * 3  # official splits are kept
    # Only train and test given: validation is carved out of train, 10 %.
    official = [Item(f"{i}.wav", "x", "train") for i in range(20)] + [Item("t.wav", "x", "test")]
    carved = Counter(it.split for it in assign_splits(official, seed=0))
    assert carved == {"train": 18, "validation": 2, "test": 1}


# ---- the paper's tasks -----------------------------------------------------------------

def test_speech_commands_v1(spc_v1):
    items = load_task("speech_commands_v1", spc_v1)
    assert set(counts(items)) == {*tasks.SPC_V1_WORDS, "_unknown_", "_silence_"}
    split = splits_of(items)
    for line in (spc_v1 / "testing_list.txt").read_text().split():
        assert split[line] == "test"
    for line in (spc_v1 / "validation_list.txt").read_text().split():
        assert split[line] == "validation"
    assert counts(items)["_unknown_"] == 6 and counts(items, "train")["yes"] == 1
    assert all(it.label == "_unknown_" for it in items if it.path.startswith(("bed/", "cat/")))
    # 3.5 s + 2.2 s of noise -> 3 + 2 whole 1 s pieces, cut 3/1/1.
    silence = [it for it in items if it.label == "_silence_"]
    assert sorted(it.segment for it in silence) == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3)]
    assert Counter(it.split for it in silence) == {"train": 3, "validation": 1, "test": 1}
    assert "_background_noise_/noise_0__2000-3000ms.wav" in split


def test_speech_commands_v2(tmp_path):
    src = speech_commands(tmp_path / "spc2", ["backward", "bed", "yes", "zero"])
    items = load_task("speech_commands_v2", src)
    assert sorted(counts(items)) == ["backward", "bed", "yes", "zero"]
    assert Counter(it.split for it in items) == {"train": 4, "validation": 4, "test": 4}
    assert not any(it.path.startswith("_background_noise_") for it in items)


def test_librispeech_100h(tmp_path):
    for spk in ("19", "26", "103"):
        for chapter in ("198", "227"):
            for utt in range(5):
                name = f"{spk}-{chapter}-{utt:04d}.flac"
                clip(tmp_path / "LibriSpeech/train-clean-100" / spk / chapter / name, fmt="FLAC", seed=utt)
    (tmp_path / "LibriSpeech/train-clean-100/19/198/19-198.trans.txt").write_text("19-198-0000 HELLO\n")
    items = load_task("librispeech_100h", tmp_path)
    assert sorted(counts(items)) == ["103", "19", "26"]
    for spk in ("19", "26", "103"):  # 10 utterances per speaker -> 8/1/1
        assert [counts(items, s)[spk] for s in tasks.SPLITS] == [8, 1, 1]
    assert items[0].path.startswith("LibriSpeech/train-clean-100/")


def test_voxceleb1(tmp_path):
    lines = []
    for s, spk in enumerate(("id10001", "id10002")):
        for code, video in (("1", "1zcIwhmdeo4"), ("1", "7w0IBEWc9Qw"),
                            ("2", "a1b2c3d4e5f"), ("3", "xyzXYZ01234")):
            rel = f"{spk}/{video}/00001.wav"
            clip(tmp_path / "wav" / rel, seed=s)
            lines.append(f"{code} {rel}")
    (tmp_path / "iden_split.txt").write_text("\n".join(lines) + "\n")
    items = load_task("voxceleb1", tmp_path)
    assert sorted(counts(items)) == ["id10001", "id10002"]
    assert splits_of(items)["wav/id10002/xyzXYZ01234/00001.wav"] == "test"
    assert Counter(it.split for it in items) == {"train": 4, "validation": 2, "test": 2}


def tut_replica(root: Path) -> Path:
    meta = ["filename\tscene_label\tidentifier\tsource_label"]
    train, evaluate = ["filename\tscene_label"], ["filename\tscene_label"]
    for scene in ("airport", "bus", "park"):
        for city in ("barcelona", "helsinki", "london", "paris", "vienna"):
            for seg in range(2):
                rel = f"audio/{scene}-{city}-0-{seg}-a.wav"
                clip(root / rel, seed=seg)
                meta.append(f"{rel}\t{scene}\t{city}-0\ta")
                (evaluate if city == "vienna" else train).append(f"{rel}\t{scene}")
    (root / "meta.csv").write_text("\n".join(meta) + "\n")
    (root / "evaluation_setup").mkdir()
    (root / "evaluation_setup/fold1_train.csv").write_text("\n".join(train) + "\n")
    (root / "evaluation_setup/fold1_evaluate.csv").write_text("\n".join(evaluate) + "\n")
    test_rows = [row.split("\t")[0] for row in evaluate[1:]]  # unlabelled: not read
    (root / "evaluation_setup/fold1_test.csv").write_text("filename\n" + "\n".join(test_rows) + "\n")
    return root


def test_tut_urban_2018(tmp_path):
    items = load_task("tut_urban_2018", tut_replica(tmp_path))
    assert sorted(counts(items)) == ["airport", "bus", "park"]
    assert all(it.split == "test" for it in items if "vienna" in it.path)
    # Validation is carved from train by recording location: one of four per scene.
    for scene in ("airport", "bus", "park"):
        assert [counts(items, s)[scene] for s in tasks.SPLITS] == [6, 2, 2]
    locations: dict[tuple[str, str], set[str]] = {}
    for it in items:
        locations.setdefault((it.label, it.group), set()).add(it.split)
    assert all(len(s) == 1 for s in locations.values())


def test_bird_detection(tmp_path):
    for dataset, ids in (("ff1010bird", range(10)), ("warblrb10k", range(100, 110))):
        rows = ["itemid,datasetid,hasbird"]
        for i in ids:
            clip(tmp_path / dataset / "wav" / f"{i}.wav", seed=i)
            rows.append(f"{i},{dataset},{i % 2}")
        (tmp_path / f"{dataset}_metadata_2018.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")  # an unrelated CSV is ignored
    items = load_task("bird_detection", tmp_path)
    assert counts(items) == {"bird": 10, "no_bird": 10}
    assert [counts(items, s)["bird"] for s in tasks.SPLITS] == [8, 1, 1]
    assert splits_of(items).keys() >= {"ff1010bird/wav/3.wav", "warblrb10k/wav/104.wav"}
    assert {it.label for it in items if it.path == "ff1010bird/wav/3.wav"} == {"bird"}


def test_musan(tmp_path):
    for label, sub in (("music", "fma"), ("speech", "librivox"), ("noise", "free-sound")):
        for i in range(10):
            clip(tmp_path / "musan" / label / sub / f"{label}-{sub}-{i:04d}.wav", seed=i)
    items = load_task("musan", tmp_path)
    assert all([counts(items, s)[label] for s in tasks.SPLITS] == [8, 1, 1] for label in tasks.MUSAN_CLASSES)


def test_nsynth(tmp_path):
    notes = {"nsynth-train": ["bass_synthetic_033-022-050", "guitar_acoustic_010-066-100",
                              "vocal_synthetic_003-088-050"],
             "nsynth-valid": ["bass_electronic_018-022-100", "guitar_electronic_022-070-127"],
             "nsynth-test": ["vocal_acoustic_000-060-075"]}
    for folder, names in notes.items():
        meta = {}
        for i, note in enumerate(names):
            clip(tmp_path / folder / "audio" / f"{note}.wav", seed=i)
            meta[note] = {"note_str": note, "instrument_family_str": note.split("_")[0], "pitch": 50}
        (tmp_path / folder / "examples.json").write_text(json.dumps(meta))
    items = load_task("nsynth", tmp_path)
    assert sorted(counts(items)) == ["bass", "guitar", "vocal"]
    assert Counter(it.split for it in items) == {"train": 3, "validation": 2, "test": 1}
    assert splits_of(items)["nsynth-test/audio/vocal_acoustic_000-060-075.wav"] == "test"


def test_voxforge_keeps_each_speaker_in_one_split(tmp_path):
    for lang in ("de", "en"):
        sessions = [f"anonymous-2008{i:04d}-{lang}" for i in range(6)]
        sessions += ["Aaron-20080318-kdl", "Aaron-20090101-xyz"]  # one speaker, two sessions
        for session in sessions:
            for u in range(2):
                clip(tmp_path / lang / session / "wav" / f"a{u:04d}.wav", seed=u)
            (tmp_path / lang / session / "etc").mkdir()
            (tmp_path / lang / session / "etc" / "PROMPTS").write_text("a0000 HALLO\n")
    items = load_task("voxforge", tmp_path)
    assert sorted(counts(items)) == ["de", "en"]
    speakers: dict[tuple[str, str], set[str]] = {}
    for it in items:
        speakers.setdefault((it.label, it.group), set()).add(it.split)
    assert len(speakers) == 2 * 7 and all(len(s) == 1 for s in speakers.values())
    assert {it.group for it in items if "Aaron" in it.path} == {"aaron"}
    assert all(counts(items, s)["en"] > 0 for s in tasks.SPLITS)


# ---- generic tasks ---------------------------------------------------------------------

def test_folder_with_and_without_split_folders(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(5):
            clip(tmp_path / "flat" / cls / "sub" / f"{i}.wav", seed=i)
            clip(tmp_path / "split" / ("train" if i < 4 else "test") / cls / f"{i}.wav", seed=i)
    flat = load_task("folder", tmp_path / "flat")
    assert [counts(flat, s)["cat"] for s in tasks.SPLITS] == [3, 1, 1]
    split = load_task("folder", tmp_path / "split", seed=1)
    assert splits_of(split)["test/dog/4.wav"] == "test"
    assert Counter(it.split for it in split) == {"train": 6, "validation": 2, "test": 2}


def test_csv_task(tmp_path):
    for i in range(6):
        clip(tmp_path / "clips" / f"{i}.wav", seed=i)
    rows = ["path,label,split", "clips/0.wav,a,train", f"{tmp_path / 'clips' / '1.wav'},b,training",
            "clips/2.wav,a,val", "clips/3.wav,b,test", "clips/4.wav,a,", "clips/5.wav,b"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    by_folder = load_task("csv", tmp_path)
    by_file = load_task("csv", tmp_path / "labels.csv")
    assert by_folder == by_file
    assert splits_of(by_file) == {"clips/0.wav": "train", "clips/1.wav": "train", "clips/2.wav": "validation",
                                  "clips/3.wav": "test", "clips/4.wav": "train", "clips/5.wav": "train"}
    # A generic layout names no dataset: the task is called after its output folder.
    info = tasks.prepare_task("csv", tmp_path / "labels.csv", tmp_path / "out" / "my-birds", progress=False)
    assert info["task"] == "my-birds"


# ---- end to end ------------------------------------------------------------------------

def test_prepare_task_writes_verified_labelled_shards(spc_v1, tmp_path):
    out = tmp_path / "shards"
    summary = prepare_task("speech_commands_v1", spc_v1, out, max_samples=16, progress=False)
    assert shards.verify_shards(str(out)) == []
    info = tasks.read_task_info(str(out))
    assert info["task"] == "speech_commands_v1" and info["paper_classes"] == 12
    assert [c["label"] for c in info["classes"]] == sorted([*tasks.SPC_V1_WORDS, "_unknown_", "_silence_"])
    assert [c["index"] for c in info["classes"]] == list(range(12))
    assert info["splits"] == {"train": 15, "validation": 13, "test": 13} == summary["splits"]
    assert summary["shards"] == 3 and info["samples"] == 41 and info["skipped"] == 0
    metas = {}
    for url in shards.shard_urls(str(out)):
        with open(url, "rb") as f:
            for key, members in shards.iter_samples(f, url):
                metas[key] = shards.sample_meta(members, key)
    assert len(metas) == 41
    assert metas["yes__00000001_nohash_0"].items() >= {"label": "yes", "split": "test",
                                                      "source": "yes/00000001_nohash_0.wav"}.items()
    assert metas["bed__000a0000_nohash_0"]["label"] == "_unknown_"
    piece = metas["_background_noise___noise_0__1000-2000ms"]
    assert piece["label"] == "_silence_" and piece["duration"] == 1.0
    assert Counter(m["split"] for m in metas.values()) == info["splits"]
    # Same inputs into the same folder: nothing to redo.
    again = prepare_task("speech_commands_v1", spc_v1, out, max_samples=16, progress=False)
    assert again["splits"] == summary["splits"]


# ---- bad input -------------------------------------------------------------------------

def test_unknown_task_names_the_known_ones(tmp_path):
    with pytest.raises(TaskError, match=r"unknown task 'spc'.*speech_commands_v1"):
        load_task("spc", tmp_path)


def test_missing_split_file_is_named(spc_v1, tmp_path):
    (spc_v1 / "testing_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"testing_list\.txt"):
        load_task("speech_commands_v1", spc_v1)
    tut = tut_replica(tmp_path / "tut")
    (tut / "evaluation_setup/fold1_evaluate.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"fold1_evaluate\.csv"):
        load_task("tut_urban_2018", tut)


def test_listed_clip_missing_is_named(spc_v1):
    with open(spc_v1 / "testing_list.txt", "a") as f:
        f.write("go/ffffffff_nohash_0.wav\n")
    with pytest.raises(FileNotFoundError, match=r"testing_list\.txt.*go/ffffffff_nohash_0\.wav"):
        load_task("speech_commands_v1", spc_v1)


def test_test_label_never_seen_in_train(tmp_path):
    for i in range(3):
        clip(tmp_path / f"{i}.wav", seed=i)
    (tmp_path / "labels.csv").write_text("0.wav,a,train\n1.wav,a,test\n2.wav,zebra,test\n")
    with pytest.raises(TaskError, match=r"2\.wav: label 'zebra' is in test but never in train"):
        load_task("csv", tmp_path)


def test_empty_class_is_named(tmp_path, spc_v1):
    clip(tmp_path / "f" / "cat" / "0.wav")
    (tmp_path / "f" / "dog").mkdir()
    with pytest.raises(TaskError, match=r"dog: class 'dog' has no audio files"):
        load_task("folder", tmp_path / "f")
    for f in (spc_v1 / "go").iterdir():
        f.unlink()
    with pytest.raises(TaskError, match=r"go: word 'go' has no audio files"):
        load_task("speech_commands_v1", spc_v1)


def test_bad_lines_are_named(tmp_path):
    clip(tmp_path / "wav/id10001/v/00001.wav")
    (tmp_path / "iden_split.txt").write_text("1 id10001/v/00001.wav\n4 id10001/v/00001.wav\n")
    with pytest.raises(TaskError, match=r"iden_split\.txt:2"):
        load_task("voxceleb1", tmp_path)
    (tmp_path / "b.csv").write_text("itemid,datasetid,hasbird\n00001,ff,maybe\n")
    with pytest.raises(TaskError, match=r"b\.csv:2: hasbird must be 0 or 1"):
        load_task("bird_detection", tmp_path)
