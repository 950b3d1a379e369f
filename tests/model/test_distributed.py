"""Real multi-process DDP: 2 workers x B pairs == 1 worker x 2B pairs, when negatives are gathered.

Two processes (spawn, gloo on CPU) each wrap :class:`ColaModel` in
``DistributedDataParallel`` and train on their half of 2B pairs. With
``gather_negatives=True`` every anchor sees all 2B positives, and the all-gather carries
gradient back to the worker that made them, so the mean of the two losses and DDP's
averaged gradients must equal the loss and gradients of ONE process on all 2B pairs.
The encoder is ``test_efficientnet_gn`` (GroupNorm: no batch statistics, so per-replica
normalisation cannot make the two set-ups differ) without stochastic depth.
Without gathering each anchor sees only its worker's B positives, and the loss differs.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from cola_ray.model import distributed
from cola_ray.config import FeatureConfig, ModelConfig
from cola_ray.model.cola import ColaModel
from helpers.services import free_port

WORLD = 2
B = 3  # pairs per worker
SAMPLES = 15600
TIMEOUT_S = 120


def model_cfg(gather: bool, similarity: str = "bilinear") -> ModelConfig:
    return dataclasses.replace(
        ModelConfig(),
        encoder="test_efficientnet_gn",
        drop_path_rate=0.0,
        proj_dim=32,
        similarity=similarity,
        gather_negatives=gather,
    )


# Pairs 0 and 3, and 1 and 5, come from the same clips, across the two ranks' halves.
CLIP_IDS = torch.tensor([10, 11, 12, 10, 13, 11])


def step(model: torch.nn.Module, anchor: torch.Tensor, positive: torch.Tensor, inner: ColaModel,
         clip_ids: torch.Tensor | None = None) -> dict:
    """One forward/backward; loss, accuracy and every parameter's gradient."""
    out = model(anchor, positive, clip_ids)
    out["loss"].backward()
    return {
        "loss": out["loss"].detach(),
        "accuracy": out["accuracy"].detach(),
        "grads": {n: p.grad.detach().clone() for n, p in inner.named_parameters()},
    }


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        data = torch.load(Path(tmp) / "data.pt")
        rows = slice(rank * B, (rank + 1) * B)
        results = {"rank": distributed.rank(), "world_size": distributed.world_size()}
        for similarity in ("bilinear", "cosine"):
            for gather in (True, False):
                model = ColaModel(FeatureConfig(), model_cfg(gather, similarity))
                model.load_state_dict(torch.load(Path(tmp) / f"{similarity}.pt"))
                ddp = DistributedDataParallel(model)
                results[similarity, gather] = step(ddp, data["anchor"][rows], data["positive"][rows], model)
            model = ColaModel(FeatureConfig(), model_cfg(True, similarity))
            model.load_state_dict(torch.load(Path(tmp) / f"{similarity}.pt"))
            results[similarity, "masked"] = step(DistributedDataParallel(model), data["anchor"][rows],
                                                 data["positive"][rows], model, CLIP_IDS[rows])
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def run_workers(tmp: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT_S)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * WORLD, f"worker exit codes {codes}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference (one process, 2B pairs) and the two DDP workers' results."""
    tmp = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    anchor = 0.1 * torch.randn(WORLD * B, SAMPLES, generator=g)
    # positives correlated with their anchors, so accuracies are not all 0
    positive = anchor + 0.05 * torch.randn(WORLD * B, SAMPLES, generator=g)
    torch.save({"anchor": anchor, "positive": positive}, tmp / "data.pt")
    reference = {}
    for similarity in ("bilinear", "cosine"):
        torch.manual_seed(1)
        model = ColaModel(FeatureConfig(), model_cfg(True, similarity))
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        torch.save(model.state_dict(), tmp / f"{similarity}.pt")
        reference[similarity] = step(model, anchor, positive, model)
        model.zero_grad(set_to_none=True)
        reference[similarity, "masked"] = step(model, anchor, positive, model, CLIP_IDS)
        model.zero_grad(set_to_none=True)
        # the no-gather loss, one worker at a time: each anchor against its worker's B only
        halves = [
            model(anchor[r * B : (r + 1) * B], positive[r * B : (r + 1) * B])["loss"] for r in range(WORLD)
        ]
        reference[similarity, "local"] = torch.stack(halves).mean().detach()
    return reference, run_workers(tmp)


def test_ranks_see_process_group(runs):
    _, workers = runs
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["world_size"] for w in workers] == [2, 2]


@pytest.mark.parametrize("masked", [False, True], ids=["all-negatives", "same-clip-masked"])
@pytest.mark.parametrize("similarity", ["bilinear", "cosine"])
def test_gathered_ddp_equals_one_process_on_global_batch(runs, similarity, masked):
    """Also with same-clip masking, whose clip ids are gathered like the positives."""
    reference, workers = runs
    ref = reference[similarity, "masked"] if masked else reference[similarity]
    ranks = [w[similarity, "masked" if masked else True] for w in workers]
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-5, atol=1e-5)
    mean_acc = torch.stack([r["accuracy"] for r in ranks]).mean()
    torch.testing.assert_close(mean_acc, ref["accuracy"])
    names = set(ref["grads"])
    assert {"head.0.weight" if similarity == "bilinear" else "head.weight"} <= names
    assert ("W" in names) == (similarity == "bilinear")
    assert any(n.startswith("encoder.backbone.") for n in names)
    for name, g_ref in ref["grads"].items():
        scale = g_ref.abs().max().item()
        assert scale > 0, f"{name} got no gradient"
        for r, res in enumerate(ranks):
            torch.testing.assert_close(
                res["grads"][name], g_ref, rtol=1e-4, atol=1e-4 * scale,
                msg=lambda m, name=name, r=r: f"rank {r}, grad of {name}: {m}",
            )


@pytest.mark.parametrize("similarity", ["bilinear", "cosine"])
def test_without_gathering_the_loss_differs(runs, similarity):
    reference, workers = runs
    mean_loss = torch.stack([w[similarity, False]["loss"] for w in workers]).mean()
    # Each anchor now competes with B - 1 negatives instead of 2B - 1: a different loss ...
    assert abs(mean_loss.item() - reference[similarity]["loss"].item()) > 1e-2
    # ... and exactly the loss of each worker's pairs on their own.
    torch.testing.assert_close(mean_loss, reference[similarity, "local"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("similarity", ["bilinear", "cosine"])
def test_masking_changes_the_loss(runs, similarity):
    reference, _ = runs
    assert abs(reference[similarity, "masked"]["loss"].item() - reference[similarity]["loss"].item()) > 1e-4


def test_single_process_collectives_are_identity():
    assert distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.all_gather(x) is x
    y = torch.ones(2)
    assert distributed.all_reduce(y, "mean") is y and torch.equal(y, torch.ones(2))
