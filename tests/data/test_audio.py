"""audio.py: decode (formats, rates, channels, faults) and the COLA pair sampler."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import soundfile as sf

from cola_ray.data.audio import (
    AUDIO_SUFFIXES,
    BadSample,
    audio_member,
    crop_pair,
    decode_audio,
    l2_normalize,
    pad_center,
)


def encode(wave: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def sine(n: int, rate: int, f: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / rate
    x = 0.5 * np.sin(2 * np.pi * f * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


# ---- decode ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fmt,subtype",
    [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("WAV", "PCM_24"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")],
)
def test_decode_stereo_44k_to_mono_16k_exact_length(fmt, subtype):
    n = 44100 + 1234
    data = encode(sine(n, 44100, channels=2), 44100, fmt, subtype)
    wave, orig_rate, channels = decode_audio(data, 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape == (math.ceil(n * 16000 / 44100),)
    assert (orig_rate, channels) == (44100, 2)
    assert np.isfinite(wave).all() and 0.3 < np.abs(wave).max() < 0.6


def test_decode_same_rate_is_lossless_for_flac():
    x = (np.random.default_rng(0).uniform(-0.5, 0.5, 8000) * 32767).round() / 32767
    wave, rate, channels = decode_audio(encode(x.astype(np.float32), 16000, "FLAC", "PCM_16"), 16000)
    assert (rate, channels) == (16000, 1)
    np.testing.assert_allclose(wave, x, atol=1 / 32767)


def test_decode_downmix_is_the_channel_mean():
    left = np.full(1600, 0.5, np.float32)
    right = np.full(1600, -0.25, np.float32)
    wave, _, channels = decode_audio(encode(np.stack([left, right], 1), 16000, "WAV", "FLOAT"), 16000)
    assert channels == 2
    np.testing.assert_allclose(wave, 0.125, atol=1e-6)


def test_decode_upsamples_8k():
    wave, rate, _ = decode_audio(encode(sine(8000, 8000), 8000, "WAV", "PCM_16"), 16000)
    assert rate == 8000 and wave.shape == (16000,)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"RIFF\x00\x00\x00\x00WAVEgarbage" * 3, "decode_error"),
        (bytes(range(256)) * 20, "decode_error"),
    ],
)
def test_decode_rejects_garbage(data, reason):
    with pytest.raises(BadSample) as err:
        decode_audio(data, 16000, name="shard-000001.tar:clip_7")
    assert err.value.reason == reason
    assert "shard-000001.tar:clip_7" in str(err.value)


def test_decode_rejects_header_only_file():
    data = encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(BadSample) as err:
        decode_audio(data, 16000)
    assert err.value.reason == "empty"


def test_decode_rejects_flac_cut_inside_its_header():
    data = encode(sine(16000, 16000), 16000, "FLAC", "PCM_16")
    with pytest.raises(BadSample) as err:
        decode_audio(data[:30], 16000)  # cut inside the STREAMINFO header
    assert err.value.reason in ("decode_error", "empty")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decode_rejects_non_finite(bad):
    x = sine(1600, 16000)
    x[100] = bad
    with pytest.raises(BadSample) as err:
        decode_audio(encode(x, 16000, "WAV", "FLOAT"), 16000)
    assert err.value.reason == "non_finite"


def test_bad_sample_survives_pickling():
    err = pickle.loads(pickle.dumps(BadSample("too_short", "k", "3 < 5")))
    assert (err.reason, err.sample, err.detail) == ("too_short", "k", "3 < 5")
    with pytest.raises(ValueError):
        BadSample("no_such_reason")


def test_audio_member_prefers_the_suffix_order():
    assert AUDIO_SUFFIXES[0] == "flac"
    assert audio_member({"json": b"{}", "wav": b"w", "flac": b"f"}) == ("flac", b"f")
    with pytest.raises(BadSample) as err:
        audio_member({"json": b"{}"}, "s:k")
    assert err.value.reason == "no_audio_member" and "s:k" in str(err.value)


# ---- normalisation and padding ---------------------------------------------------------

def test_l2_normalize_unit_norm_and_silence_stays_finite():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.linalg.norm(l2_normalize(x)) == pytest.approx(1.0, rel=1e-5)
    silent = l2_normalize(np.zeros(100, np.float32))
    assert np.isfinite(silent).all() and not silent.any()


def test_pad_center_puts_the_clip_in_the_middle():
    out = pad_center(np.ones(4, np.float32), 10)
    np.testing.assert_array_equal(out, [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    assert pad_center(np.ones(12, np.float32), 10).shape == (12,)


# ---- crop_pair -------------------------------------------------------------------------

def test_crop_pair_shapes_and_dtype():
    wave = np.random.default_rng(0).standard_normal(48000).astype(np.float32)
    a, p = crop_pair(wave, 15600, np.random.default_rng(1))
    assert a.shape == p.shape == (15600,)
    assert a.dtype == p.dtype == np.float32


def test_crop_pair_is_deterministic_per_seed():
    wave = np.random.default_rng(0).standard_normal(48000).astype(np.float32)
    a1, p1 = crop_pair(wave, 1000, np.random.default_rng(7), noise_std=0.01)
    a2, p2 = crop_pair(wave, 1000, np.random.default_rng(7), noise_std=0.01)
    a3, _ = crop_pair(wave, 1000, np.random.default_rng(8), noise_std=0.01)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(p1, p2)
    assert not np.array_equal(a1, a3)


def test_crops_come_from_the_l2_normalised_clip():
    wave = np.arange(1, 5001, dtype=np.float32)  # each value tells where a crop starts
    unit = wave / np.linalg.norm(wave)
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, p = crop_pair(wave, 500, rng)
        for crop in (a, p):
            start = int(round(crop[0] / unit[0])) - 1
            assert 0 <= start <= 4500
            np.testing.assert_allclose(crop, unit[start : start + 500], rtol=1e-5)


def test_crop_offsets_are_independent_and_uniform():
    wave = np.arange(1, 201, dtype=np.float32)
    rng = np.random.default_rng(0)
    starts = []
    for _ in range(2000):
        a, p = crop_pair(wave, 100, rng, l2_normalize=False)
        starts.append((int(a[0]) - 1, int(p[0]) - 1))
    s = np.array(starts)
    assert s.min() == 0 and s.max() == 100  # both ends of [0, T - n] are reachable
    assert (s[:, 0] == s[:, 1]).mean() < 0.05  # not the same crop twice
    assert abs(np.corrcoef(s[:, 0], s[:, 1])[0, 1]) < 0.1


def test_short_clip_is_padded_centred_or_skipped():
    wave = np.ones(300, np.float32)
    a, p = crop_pair(wave, 1000, np.random.default_rng(0))
    expected = pad_center(l2_normalize(wave), 1000)
    np.testing.assert_allclose(a, expected)
    np.testing.assert_allclose(p, expected)
    assert a[:350].sum() == 0 and a[350:650].all() and a[650:].sum() == 0
    with pytest.raises(BadSample) as err:
        crop_pair(wave, 1000, np.random.default_rng(0), short="skip", name="s:k")
    assert err.value.reason == "too_short" and "s:k" in str(err.value)


def test_noise_goes_on_the_positive_only():
    wave = np.ones(2000, np.float32)
    clean_a, clean_p = crop_pair(wave, 1000, np.random.default_rng(5))
    a, p = crop_pair(wave, 1000, np.random.default_rng(5), noise_std=0.001)
    np.testing.assert_array_equal(a, clean_a)
    diff = p - clean_p
    assert 0.0005 < diff.std() < 0.002


def test_crop_pair_rejects_bad_arguments():
    with pytest.raises(ValueError):
        crop_pair(np.zeros((2, 100), np.float32), 10, np.random.default_rng(0))
    with pytest.raises(ValueError):
        crop_pair(np.zeros(100, np.float32), 10, np.random.default_rng(0), short="trim")
