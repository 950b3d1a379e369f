"""timm backbones behind the log-mel frontend."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from cola_ray.config import FeatureConfig, ModelConfig
from cola_ray.model.encoder import WaveformEncoder, create_backbone


def tiny(**kw) -> ModelConfig:
    """A tiny timm EfficientNet (timm's own test model) unless ``encoder`` says otherwise."""
    return dataclasses.replace(ModelConfig(), **{"encoder": "test_efficientnet", **kw})


@pytest.mark.parametrize("name", ["test_efficientnet", "test_efficientnet_gn"])
def test_waveform_encoder_shapes(name):
    enc = WaveformEncoder(FeatureConfig(), tiny(encoder=name))
    h = enc(torch.randn(3, 15600) * 0.1)
    assert h.shape == (3, enc.embedding_dim)
    assert enc.embedding_dim == enc.backbone.num_features
    assert torch.isfinite(h).all()


def test_efficientnet_b0_gives_1280d_from_64x96():
    backbone = create_backbone(ModelConfig())  # efficientnet_b0, max pool, no classifier
    backbone.eval()
    with torch.no_grad():
        h = backbone(torch.randn(2, 1, 64, 96))
    assert h.shape == (2, 1280)
    # max pooling, as the paper (timm's default would be avg)
    assert backbone.global_pool.pool_type == "max"


def test_embedding_dim_counts_concatenating_pools():
    enc = WaveformEncoder(FeatureConfig(), tiny(global_pool="catavgmax"))
    assert enc.embedding_dim == 2 * enc.backbone.num_features
    assert enc(torch.randn(2, 15600)).shape == (2, enc.embedding_dim)


def test_drop_path_rate_is_applied():
    backbone = create_backbone(tiny(drop_path_rate=0.2))
    rates = [m.drop_prob for m in backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0


def test_model_without_drop_path_falls_back(caplog):
    with caplog.at_level(logging.WARNING, logger="cola_ray.model.encoder"):
        backbone = create_backbone(tiny(encoder="dla46_c", drop_path_rate=0.2))
    assert "drop_path_rate" in caplog.text
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 1, 64, 96)).dim() == 2


def test_unknown_model_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="no_such_net_b9"):
        create_backbone(tiny(encoder="no_such_net_b9"))
    with pytest.raises(ValueError, match="no_such_net_b9"):
        WaveformEncoder(FeatureConfig(), tiny(encoder="no_such_net_b9"))


def test_pretrained_weights_never_requested(monkeypatch):
    import timm

    seen = {}
    real = timm.create_model

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    create_backbone(tiny())
    assert seen["pretrained"] is False and seen["in_chans"] == 1 and seen["num_classes"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_channels_last_bf16():
    enc = WaveformEncoder(FeatureConfig(), tiny(channels_last=True))
    enc = enc.to("cuda", memory_format=torch.channels_last)
    seen = []
    enc.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = enc(torch.randn(4, 15600, device="cuda") * 0.1)
    assert h.shape == (4, enc.embedding_dim) and torch.isfinite(h.float()).all()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
