"""Ray Data pipeline: shards -> decode_and_crop -> pairs, on a real local Ray."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import soundfile as sf

from cola_ray.data import shards
from cola_ray.config import DataConfig
from cola_ray.data.pipeline import SampleCounter, check_budget, ErrorBudgetExceeded, read_pairs

pytestmark = pytest.mark.slow

RATE = 16000
SEG = 15600


def tone_corpus(folder, freqs, seconds=2.0):
    """One clip per frequency: a pair's two crops must share it; other clips must not."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    for f in freqs:
        sf.write(folder / f"tone_{int(f)}.wav", 0.5 * np.sin(2 * np.pi * f * t), RATE)
    return folder


def peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x))
    return float(np.argmax(spec) * RATE / len(x))


@pytest.fixture(scope="module")
def tone_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tones")
    freqs = [200 + 150 * i for i in range(12)]
    tone_corpus(root / "src", freqs)
    shards.build_shards(root / "src", root / "shards", max_samples=5, progress=False)
    return root / "shards", freqs


def test_pairs_come_from_one_clip_and_change_every_epoch(ray_local, tone_shards):
    path, freqs = tone_shards
    ds = read_pairs(DataConfig(shards=str(path), decode_num_cpus=0.5))
    epochs = []
    for _ in range(2):
        rows = list(ds.iter_rows())
        assert len(rows) == len(freqs)
        by_clip = {}
        for row in rows:
            assert row["anchor"].shape == (SEG,) and row["positive"].shape == (SEG,)
            # data.transport=int16: PCM + the float32 step and L2 gain the training device applies.
            assert row["anchor"].dtype == np.int16 and row["step"] > 0 and row["gain"] > 0
            fa, fp = peak_hz(row["anchor"]), peak_hz(row["positive"])
            assert abs(fa - fp) < 3, "anchor and positive come from different clips"
            by_clip[round(fa / 150)] = row["anchor"]
        assert len(by_clip) == len(freqs), "every clip appears once per epoch"
        epochs.append(by_clip)
    changed = sum(not np.array_equal(epochs[0][k], epochs[1][k]) for k in epochs[0])
    assert changed >= len(freqs) - 1, "crops should be fresh every epoch"


def _tar_with_bad_members(path, good_wave):
    """A shard made elsewhere (no manifest): good clips, plus corrupt, empty and audio-less samples."""
    buf = io.BytesIO()
    sf.write(buf, good_wave, RATE, format="WAV")
    good = buf.getvalue()
    members = [
        ("a.wav", good), ("a.json", b'{"k": 1}'),
        ("b.flac", b"not audio at all"),
        ("c.wav", b""),
        ("d.json", b"{}"),
        ("e.wav", good), ("e.json", b"{broken"),
        ("f.wav", good),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_members_are_counted_not_fatal(ray_local, tmp_path):
    import ray

    wave = (0.3 * np.sin(np.linspace(0, 2000, RATE * 2))).astype(np.float32)
    (tmp_path / "s").mkdir()
    _tar_with_bad_members(tmp_path / "s" / "x-000.tar", wave)
    counter = SampleCounter.remote()
    rows = list(read_pairs(DataConfig(shards=str(tmp_path / "s"), decode_num_cpus=0.5), counter).iter_rows())
    assert len(rows) == 2  # a and f
    snap = ray.get(counter.snapshot.remote())
    assert snap["good"] == 2
    assert snap["bad"] == {"decode_error": 1, "empty": 1, "no_audio_member": 1, "bad_json": 1}
    with pytest.raises(ErrorBudgetExceeded, match="x-000.tar"):
        check_budget(snap, DataConfig(min_samples_for_budget=1))
    check_budget(snap, DataConfig(min_samples_for_budget=1, max_bad_fraction=0.9))


def test_missing_shard_path_fails_fast_naming_it(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_pairs(DataConfig(shards=str(tmp_path / "nowhere")))
