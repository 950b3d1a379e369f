"""The optimiser's groups and the learning-rate schedule (no Ray workers)."""

from __future__ import annotations

import math

import pytest
import torch

from cola_ray.config import ConfigError, load_config
from cola_ray.model.cola import ColaModel
from cola_ray.train.loop import lr_factor, make_optimizer


def cfg_of(*overrides: str):
    return load_config(None, ["model.encoder=test_efficientnet", "model.proj_dim=16", *overrides])


def test_warmup_then_cosine_reaches_zero_at_max_steps():
    cfg = cfg_of("train.warmup_steps=10", "train.lr_decay=cosine", "train.max_steps=110")
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 60) == pytest.approx(0.5)
    assert lr_factor(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg_of(), 12345) == 1.0  # the paper: constant


def test_cosine_without_max_steps_is_refused_naming_the_fields():
    with pytest.raises(ConfigError, match="train.max_steps"):
        cfg_of("train.lr_decay=cosine")


def test_bilinear_lr_puts_w_and_the_scale_in_their_own_group():
    cfg = cfg_of("model.bilinear_scale=learnable", "train.lr=1e-4", "train.bilinear_lr=1e-2")
    model = ColaModel(cfg.features, cfg.model)
    opt = make_optimizer(model, cfg)
    rest, sim = opt.param_groups
    assert (rest["lr"], sim["lr"]) == (1e-4, 1e-2)
    assert {id(p) for p in sim["params"]} == {id(model.W), id(model.logit_scale)}
    assert len(rest["params"]) + 2 == len(list(model.parameters()))
    # Without it, one group: optimiser states of checkpoints written before the option load.
    plain = cfg_of()
    old = torch.optim.Adam(ColaModel(plain.features, plain.model).parameters(), lr=1e-4)
    new = make_optimizer(ColaModel(plain.features, plain.model), plain)
    new.load_state_dict(old.state_dict())
    assert len(new.param_groups) == 1


def test_w_moves_faster_with_its_own_rate():
    """One Adam step moves every entry by about its rate: W by bilinear_lr, the rest by lr."""
    cfg = cfg_of("train.lr=1e-5", "train.bilinear_lr=1e-2")
    torch.manual_seed(0)
    model = ColaModel(cfg.features, cfg.model)
    opt = make_optimizer(model, cfg)
    w0, head0 = model.W.detach().clone(), model.head[0].weight.detach().clone()
    out = model(torch.randn(4, cfg.data.segment_samples), torch.randn(4, cfg.data.segment_samples))
    out["loss"].backward()
    opt.step()
    dw = (model.W.detach() - w0).abs().max().item()
    dhead = (model.head[0].weight.detach() - head0).abs().max().item()
    assert math.isclose(dw, 1e-2, rel_tol=0.05) and dhead <= 1.05e-5
