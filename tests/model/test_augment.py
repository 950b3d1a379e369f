"""Augmentations of the training crops: reproducible, bounded as configured, off by default."""

from __future__ import annotations

import pytest
import torch

from cola_ray.config import AugmentConfig, Config, ConfigError, FeatureConfig, ModelConfig, load_config, n_frames
from cola_ray.model.augment import Augment
from cola_ray.model.cola import ColaModel

S = 15600


def crops(b: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, S, generator=g) * 0.1, torch.randn(b, S, generator=g) * 0.1


def test_off_by_default_and_identity_when_off():
    aug = Augment(AugmentConfig(), FeatureConfig())
    a, p = crops()
    gen = aug.generator(0, 0, 0, torch.device("cpu"))
    a2, p2 = aug.waves(a, p, gen)
    assert not aug.active and a2 is a and p2 is p
    assert aug.spec_keep(16, 97, gen, torch.device("cpu")) is None


def test_draws_are_a_function_of_seed_rank_and_step():
    aug = Augment(AugmentConfig(gain_db=6, mix_prob=0.5, noise_prob=0.5, time_shift=0.2, freq_mask=8),
                  FeatureConfig())
    a, p = crops()

    def draw(seed, rank, step):
        gen = aug.generator(seed, rank, step, torch.device("cpu"))
        return aug.waves(a, p, gen)[0], aug.spec_keep(16, 97, gen, torch.device("cpu"))

    x1, m1 = draw(0, 0, 5)
    x2, m2 = draw(0, 0, 5)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    for other in (draw(1, 0, 5), draw(0, 1, 5), draw(0, 0, 6)):
        assert not torch.equal(x1, other[0])


def test_gain_stays_within_its_range_in_db():
    aug = Augment(AugmentConfig(gain_db=6), FeatureConfig())
    a, p = crops(64)
    a2, _ = aug.waves(a, p, aug.generator(0, 0, 0, torch.device("cpu")))
    db = 10 * torch.log10(a2.pow(2).mean(1) / a.pow(2).mean(1))
    assert db.abs().max() <= 6.0 + 1e-4 and db.std() > 1.0


def test_mixing_adds_another_clip_at_the_drawn_snr():
    aug = Augment(AugmentConfig(mix_prob=1.0, mix_min_snr_db=10, mix_max_snr_db=10), FeatureConfig())
    a, p = crops(8)
    a2, p2 = aug.waves(a, p, aug.generator(0, 0, 0, torch.device("cpu")))
    added = a2 - a
    snr = 10 * torch.log10(a.pow(2).mean(1) / added.pow(2).mean(1))
    assert torch.allclose(snr, torch.full_like(snr, 10.0), atol=1e-3)
    # The added crop is another anchor (half a batch away), never the crop's own positive.
    other = a.roll(4, 0)
    w = (added * other).sum(1, keepdim=True) / other.pow(2).sum(1, keepdim=True)
    assert (added - w * other).abs().max() < 1e-5 and torch.all(w > 0)


def test_masks_cut_one_band_of_at_most_the_configured_width():
    aug = Augment(AugmentConfig(freq_mask=8, time_mask=10), FeatureConfig())
    keep = aug.spec_keep(32, 97, aug.generator(0, 0, 0, torch.device("cpu")), torch.device("cpu"))
    assert keep.shape == (32, 1, 64, 97)
    freq_cut = (keep.amax(dim=3) == 0).sum(dim=2).squeeze(1)  # bins masked in every frame
    time_cut = (keep.amax(dim=2) == 0).sum(dim=2).squeeze(1)
    assert freq_cut.max() <= 8 and time_cut.max() <= 10 and freq_cut.sum() > 0 and time_cut.sum() > 0


def test_the_model_takes_the_masks_and_running_normalisation():
    cfg = load_config(None, ["model.encoder=test_efficientnet", "model.proj_dim=16", "features.normalize=running",
                             "augment.freq_mask=8"])
    model = ColaModel(cfg.features, cfg.model)
    assert model.encoder.norm is not None
    a, p = crops(4)
    aug = Augment(cfg.augment, cfg.features)
    keep = aug.spec_keep(8, n_frames(cfg.features, S), aug.generator(0, 0, 0, torch.device("cpu")),
                         torch.device("cpu"))
    out = model(a, p, None, keep)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.encoder.norm.num_batches_tracked.item() == 1
    # normalize=none (the default) has no such buffers: checkpoints written before load as they were.
    plain = ColaModel(FeatureConfig(), ModelConfig(encoder="test_efficientnet", proj_dim=16))
    assert plain.encoder.norm is None and not any("norm.running" in k for k in plain.state_dict())


@pytest.mark.parametrize("override, field", [("augment.mix_prob=1.5", "augment.mix_prob"),
                                             ("augment.mix_min_snr_db=30", "augment.mix_min_snr_db"),
                                             ("augment.freq_mask=64", "augment.freq_mask"),
                                             ("features.normalize=global", "features.normalize")])
def test_bad_values_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_default_config_is_the_paper():
    c = Config()
    assert not c.augment.active and c.features.normalize == "none"
