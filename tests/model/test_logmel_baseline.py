"""The hand-made baseline as an encoder (``--encoder logmel``): mean and std over frames of
the pre-training log-mel, checked against a float64 numpy recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cola_ray.config import FeatureConfig
from cola_ray.downstream.encoders import EncoderNotFound, resolve_encoder
from cola_ray.model.encoder import LogMelStats
from test_features import htk_mel_matrix, reference_log_mel


def test_logmel_stats_match_a_numpy_recomputation():
    cfg = FeatureConfig()
    rng = np.random.default_rng(3)
    t = np.arange(15600) / cfg.sample_rate
    # A tone sweep, noise, a tone in noise: bands with very different means and spreads (each
    # loud enough everywhere that no band sits on the log floor, where float32 and float64 part).
    noise = rng.normal(0, 0.05, (3, t.size))
    wave = noise + np.stack([np.sin(2 * np.pi * (200 + 3000 * t) * t), rng.normal(0, 0.3, t.size),
                             0.3 * np.sin(2 * np.pi * 440 * t)])
    out = LogMelStats(cfg)(torch.from_numpy(wave).float()).double().numpy()
    ref = reference_log_mel(wave, cfg, htk_mel_matrix(cfg))[:, 0]  # (B, n_mels, T)
    expected = np.concatenate([ref.mean(axis=-1), ref.std(axis=-1)], axis=1)
    assert out.shape == (3, 2 * cfg.n_mels)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_logmel_resolves_as_an_encoder_reference():
    encoder, info = resolve_encoder("logmel")
    assert info["kind"] == "features" and info["encoder"] == "logmel"
    assert info["embedding_dim"] == encoder.embedding_dim == 128
    assert not list(encoder.parameters())  # nothing learned
    with torch.no_grad():
        h = encoder(torch.randn(2, 16000))
    assert h.shape == (2, 128) and torch.isfinite(h).all()


def test_a_misspelt_baseline_is_named():
    with pytest.raises(EncoderNotFound, match="log-mel"):
        resolve_encoder("logmels")
