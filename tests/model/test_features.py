"""LogMel against the paper's shapes, a pure tone, and a float64 numpy reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cola_ray.config import FeatureConfig, n_frames
from cola_ray.model.features import LogMel

SR = 16000


def reference_log_mel(wave: np.ndarray, cfg: FeatureConfig, mel_matrix: np.ndarray) -> np.ndarray:
    """float64 numpy: (B, S) -> (B, 1, n_mels, T), written out step by step as the TF code."""
    n = 1 + (wave.shape[1] - cfg.win_length) // cfg.hop_length
    starts = np.arange(n) * cfg.hop_length
    frames = np.stack([wave[:, s : s + cfg.win_length] for s in starts], axis=1)  # (B, T, win)
    k = np.arange(cfg.win_length)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * k / cfg.win_length)  # periodic Hann
    spec = np.abs(np.fft.rfft(frames * window, n=cfg.n_fft, axis=-1)) ** cfg.power  # (B, T, F)
    mel = spec @ mel_matrix  # (B, T, n_mels)
    logmel = np.log(np.clip(mel, cfg.log_floor, cfg.log_ceiling))
    return logmel.transpose(0, 2, 1)[:, None]


def htk_mel_matrix(cfg: FeatureConfig) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) HTK triangles (linear in Hz between mel-spaced points)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    pts = hz(np.linspace(mel(cfg.f_min), mel(cfg.f_max), cfg.n_mels + 2))
    freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    lo, c, hi = pts[:-2], pts[1:-1], pts[2:]
    up = (freqs[:, None] - lo) / (c - lo)
    down = (hi - freqs[:, None]) / (hi - c)
    w = np.maximum(0.0, np.minimum(up, down))
    w[0] = 0.0  # DC bin zeroed
    return w


def test_shape_paper_segment():
    cfg = FeatureConfig()
    out = LogMel(cfg)(torch.randn(3, 15600))
    assert out.shape == (3, 1, 64, 96)
    assert out.dtype == torch.float32
    assert n_frames(cfg, 15600) == 96
    assert LogMel(cfg)(torch.randn(2, 16000)).shape == (2, 1, 64, 98)  # the code's 1.0 s crop


def test_buffers_follow_module_but_not_state_dict():
    m = LogMel(FeatureConfig())
    assert dict(m.state_dict()) == {}
    names = {n for n, _ in m.named_buffers()}
    assert names == {"window", "mel_matrix"}
    assert m.mel_matrix.shape == (513, 64)


def test_mel_matrix_is_htk_from_60_to_7800_hz_with_dc_zeroed():
    cfg = FeatureConfig()
    m = LogMel(cfg).mel_matrix.double().numpy()
    np.testing.assert_allclose(m, htk_mel_matrix(cfg), atol=1e-5)  # torchaudio builds it in fp32
    assert (m[0] == 0).all()


def test_sine_peaks_in_nearest_mel_bin():
    cfg = FeatureConfig()
    t = torch.arange(15600, dtype=torch.float64) / SR
    wave = (0.5 * torch.sin(2 * math.pi * 1000.0 * t)).float()[None]
    out = LogMel(cfg)(wave)[0, 0]  # (n_mels, T)
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    centres = 700.0 * (10.0 ** (np.linspace(mel(60.0), mel(7800.0), 66)[1:-1] / 2595.0) - 1.0)
    expected = int(np.argmin(np.abs(centres - 1000.0)))
    peaks = out.argmax(dim=0)  # peak bin of every frame
    assert (peaks == expected).all(), (peaks.unique(), expected)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_matches_float64_numpy_reference(power):
    cfg = dataclasses.replace(FeatureConfig(), power=power)
    g = torch.Generator().manual_seed(0)
    # Noise plus a tone, at a level where no mel energy sits on the clamp.
    t = torch.arange(15600) / SR
    wave = 0.05 * torch.randn(2, 15600, generator=g) + 0.3 * torch.sin(2 * math.pi * 440.0 * t)
    out = LogMel(cfg)(wave).double().numpy()
    ref = reference_log_mel(wave.double().numpy(), cfg, htk_mel_matrix(cfg))
    assert out.shape == ref.shape == (2, 1, 64, 96)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_silence_is_log_floor_everywhere():
    cfg = FeatureConfig()
    out = LogMel(cfg)(torch.zeros(2, 15600))
    assert torch.equal(out, torch.full_like(out, math.log(cfg.log_floor)))


def test_fp32_inside_autocast():
    m = LogMel(FeatureConfig())
    wave = torch.randn(2, 15600) * 0.1
    ref = m(wave)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(wave)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_rejects_bad_input():
    m = LogMel(FeatureConfig())
    with pytest.raises(ValueError, match="at least"):
        m(torch.zeros(1, 399))
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        m(torch.zeros(15600))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_under_autocast():
    m = LogMel(FeatureConfig())
    wave = torch.randn(4, 15600) * 0.1
    ref = m(wave)
    m = m.to("cuda")
    assert m.mel_matrix.is_cuda and m.window.is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(wave.cuda())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-4)
