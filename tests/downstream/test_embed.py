"""Segmenting a clip for the downstream evaluation (pure numpy; the Ray part is in test_sweep.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cola_ray.downstream.embed import split_segments, task_classes

N = 15600


def wave(t: int) -> np.ndarray:
    return np.random.default_rng(t).normal(0, 0.1, t).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def test_remainder_aligned_to_the_end_by_default():
    x = wave(24000)  # 1.5 s: one full segment and 8400 samples more
    segments, starts = split_segments(x, N)
    assert starts.tolist() == [0, 24000 - N]
    np.testing.assert_allclose(segments[0], unit(x[:N]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(segments[1], unit(x[-N:]), rtol=1e-5, atol=1e-7)  # only real audio
    np.testing.assert_allclose(np.linalg.norm(segments, axis=1), 1.0, rtol=1e-5)


def test_drop_and_pad_remainders():
    x = wave(2 * N + 100)
    segments, starts = split_segments(x, N, "drop")
    assert starts.tolist() == [0, N] and segments.shape == (2, N)
    segments, starts = split_segments(x, N, "pad")
    assert starts.tolist() == [0, N, 2 * N]
    assert np.count_nonzero(segments[2]) == 100  # 100 samples of audio, the rest silence
    np.testing.assert_allclose(segments[2][:100], unit(x[2 * N:]), rtol=1e-5, atol=1e-7)


def test_whole_segments_and_short_clips():
    segments, starts = split_segments(wave(2 * N), N)
    assert starts.tolist() == [0, N]  # no remainder, no extra segment
    short = wave(10000)
    segments, starts = split_segments(short, N)
    assert segments.shape == (1, N) and starts.tolist() == [0]
    left = (N - 10000) // 2
    np.testing.assert_allclose(segments[0][left:left + 10000], unit(short), rtol=1e-5, atol=1e-7)
    assert not segments[0][:left].any() and not segments[0][left + 10000:].any()
    silent, _ = split_segments(np.zeros(N + 5, np.float32), N)
    assert np.isfinite(silent).all()  # eps-bounded norm: silence stays silence
    with pytest.raises(ValueError, match="remainder"):
        split_segments(short, N, "wrap")


def test_task_classes_from_task_json():
    listed = {"classes": [{"index": 1, "label": "yes"}, {"index": 0, "label": "no"}]}
    assert task_classes(listed) == ["no", "yes"]
    assert task_classes({"classes": ["b", "a"]}) == ["b", "a"]
    assert task_classes({}) == []
