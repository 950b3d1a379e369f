"""ColaModel in one process: structure of g and W, one encoder pass over 2B crops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cola_ray.config import FeatureConfig, ModelConfig
from cola_ray.model.cola import ColaModel


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(), **{"encoder": "test_efficientnet", **kw})


def test_bilinear_head_and_W():
    torch.manual_seed(0)
    model = ColaModel(FeatureConfig(), tiny())
    assert [type(m) for m in model.head] == [nn.Linear, nn.LayerNorm, nn.Tanh]
    assert model.head[0].in_features == model.encoder.embedding_dim
    assert model.W.shape == (512, 512)
    assert model.W.std().item() == pytest.approx(0.05, rel=0.02)
    assert model.W.mean().abs().item() < 1e-3


def test_cosine_head_is_linear_and_has_no_W():
    model = ColaModel(FeatureConfig(), tiny(similarity="cosine", proj_dim=16))
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 16
    assert model.W is None
    assert not any(k == "W" for k in model.state_dict())


@pytest.mark.parametrize("similarity", ["bilinear", "cosine"])
def test_forward_one_encoder_pass_and_gradients_everywhere(similarity):
    model = ColaModel(FeatureConfig(), tiny(similarity=similarity, proj_dim=16))
    batches = []
    model.encoder.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    anchor, positive = torch.randn(4, 15600) * 0.1, torch.randn(4, 15600) * 0.1
    out = model(anchor, positive)
    assert batches == [8]  # anchors and positives together: batch norm sees 2B, as the authors
    assert set(out) == {"loss", "accuracy"}
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    # Loss and accuracy by hand from the same projections (batch norm in train mode: the same
    # batch gives the same statistics): row i's positive is column i.
    with torch.no_grad():
        z = model.head(model.encoder(torch.cat([anchor, positive])))
        za, zp = z[:4], z[4:]
        if similarity == "bilinear":
            logits = za @ model.W @ zp.T
        else:
            logits = nn.functional.normalize(za, dim=1) @ nn.functional.normalize(zp, dim=1).T / 0.2
        labels = torch.arange(4)
    torch.testing.assert_close(out["loss"].detach(), nn.functional.cross_entropy(logits, labels))
    assert out["accuracy"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_embed_and_state_dict():
    model = ColaModel(FeatureConfig(), tiny())
    h = model.embed(torch.randn(2, 15600))
    assert h.shape == (2, model.encoder.embedding_dim)
    keys = list(model.state_dict())
    assert all(k.split(".")[0] in {"encoder", "head", "W"} for k in keys)
    assert not any("frontend" in k for k in keys)  # window and mel matrix are not weights


def test_the_compile_machinery_traces_the_forward_and_keeps_parameter_names():
    """``train.compile``: the step runs the compiled module; checkpoints hold plain names.
    The ``eager`` backend traces the whole forward (log-mel, encoder, head, loss) without
    generating code, so this checks that the model compiles at all, quickly, on CPU."""
    from cola_ray.train.loop import compiled

    torch.manual_seed(0)
    model = ColaModel(FeatureConfig(), tiny(similarity="cosine", proj_dim=16))
    anchor, positive = torch.randn(4, 15600) * 0.1, torch.randn(4, 15600) * 0.1
    ids = torch.tensor([1.0, 2.0, 2.0, 3.0])
    model.eval()  # batch norm statistics are not updated by either call
    want = model(anchor, positive, ids)
    fast = compiled(model, "eager")
    assert fast is not model and compiled(model, "") is model
    got = fast(anchor, positive, ids)
    torch.testing.assert_close(got["loss"], want["loss"])
    got["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # gradients reach the plain module
    assert list(model.state_dict()) == [k.removeprefix("_orig_mod.") for k in fast.state_dict()]
