"""Small things several test modules build the same way: a labelled task, a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cola_ray import shards, synthetic
from cola_ray.checkpoint import TrainState, save_checkpoint
from cola_ray.config import Config, ModelConfig


def labelled_task(root: Path, classes: list[str], *, n_clips: int, name: str, max_samples: int) -> Path:
    """Synthetic clips of ``classes`` -> labelled shards under ``root/shards`` with a task.json
    listing ``classes`` in the given order; returns ``root``."""
    labels = synthetic.make_corpus(root / "clips", n_clips=n_clips, seconds=1.5, n_classes=len(classes), seed=0)
    shards.build_shards(root / "clips", root / "shards", labels_csv=labels, max_samples=max_samples, progress=False)
    indexed = [{"index": i, "label": c} for i, c in enumerate(classes)]
    (root / "shards" / "task.json").write_text(json.dumps({"task": name, "classes": indexed}))
    return root


def hand_made_checkpoint(folder: Path) -> str:
    """A pre-training checkpoint (test_efficientnet, no stochastic depth) as training writes them."""
    from cola_ray.model import ColaModel

    cfg = Config(model=ModelConfig(encoder="test_efficientnet", drop_path_rate=0.0, proj_dim=32))
    torch.manual_seed(1)
    model = ColaModel(cfg.features, cfg.model)
    return str(save_checkpoint(folder / "checkpoint_000000007", model, None, TrainState(step=7, config=cfg.to_dict())))
