"""A restore puts back the weights and the optimiser state bit for bit, so the next step is
the step the uninterrupted run would have taken (no Ray: the functions the workers call)."""

from __future__ import annotations

import torch

from cola_ray.config import load_config
from cola_ray.model.cola import ColaModel
from cola_ray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cola_ray.train.loop import make_optimizer


def step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    a, p = torch.randn(4, 15600, generator=g) * 0.1, torch.randn(4, 15600, generator=g) * 0.1
    opt.zero_grad()
    model(a, p)["loss"].backward()
    opt.step()


def test_restored_weights_and_optimizer_state_are_bitwise_and_the_next_step_is_the_same(tmp_path):
    cfg = load_config(None, ["model.encoder=test_efficientnet", "model.proj_dim=16", "model.drop_path_rate=0.0",
                             "train.bilinear_lr=1e-3", "features.normalize=running"])
    torch.manual_seed(0)
    model = ColaModel(cfg.features, cfg.model)
    opt = make_optimizer(model, cfg)
    for s in range(3):
        step(model, opt, s)
    quarantine = {"shard-000001.tar": {"reason": "size is 10 bytes, the manifest says 20 (truncated or replaced)",
                                       "version": "sha256=ab bytes=20"}}
    folder = save_checkpoint(tmp_path / "checkpoint_000000003", model, opt,
                             TrainState(step=3, train_seconds=1.5, quarantine=quarantine))

    torch.manual_seed(123)  # another init: everything must come from the checkpoint
    restored = ColaModel(cfg.features, cfg.model)
    ropt = make_optimizer(restored, cfg)
    state = load_checkpoint(folder, restored, ropt)
    assert (state.step, state.train_seconds, state.quarantine) == (3, 1.5, quarantine)  # the run's quarantine too
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name  # running statistics of batch and log-mel norm included
    want, got = opt.state_dict(), ropt.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for k, s in want["state"].items():
        for key, value in s.items():
            assert torch.equal(value, got["state"][k][key]), (k, key)

    step(model, opt, 99)
    step(restored, ropt, 99)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after the same step"
