"""Small things several test modules build the same way: a labelled task, a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cola_ray.data import tasks
from cola_ray.train.checkpoint import TrainState, save_checkpoint
from cola_ray.config import Config, ModelConfig, load_config


def make_shards(root: Path, *, n_clips: int, seconds: float, seed: int, max_samples: int,
                out: str | Path | None = None, labels: bool = True) -> str | Path:
    """The synthetic corpus (:func:`cola_ray.data.synthetic.make_corpus`: ``n_clips`` clips of
    ``seconds``, kept in ``root/clips``) as shards of ``max_samples`` at ``out`` (default
    ``root/shards``; a folder or s3://), with the family labels in each sample's json unless
    ``labels=False``. Returns ``out``: the one corpus-and-shards maker of the tests."""
    from cola_ray.data import shards, synthetic

    csv = synthetic.make_corpus(root / "clips", n_clips=n_clips, seconds=seconds, seed=seed)
    out = root / "shards" if out is None else out
    shards.build_shards(root / "clips", out, labels_csv=csv if labels else None, max_samples=max_samples,
                        progress=False)
    return out


def labelled_task(root: Path, classes: list[str], *, n_clips: int, name: str, max_samples: int) -> Path:
    """Synthetic clips of ``classes`` (1.5 s, kept in ``root/clips``) -> labelled shards under
    ``root/shards`` with a task.json listing ``classes`` in the given order; returns ``root``."""
    tasks.synthetic_task(root / "shards", n_clips=n_clips, seconds=1.5, n_classes=len(classes), classes=classes,
                         name=name, max_samples=max_samples, clips_dir=root / "clips")
    return root


def hand_made_checkpoint(folder: Path) -> str:
    """A pre-training checkpoint (test_efficientnet, no stochastic depth) as training writes them."""
    from cola_ray.model.cola import ColaModel

    cfg = Config(model=ModelConfig(encoder="test_efficientnet", drop_path_rate=0.0, proj_dim=32))
    torch.manual_seed(1)
    model = ColaModel(cfg.features, cfg.model)
    return str(save_checkpoint(folder / "checkpoint_000000007", model, None, TrainState(step=7, config=cfg.to_dict())))


def tiny_config(tmp_path: Path, shards_path, tracking_uri: str, *extra: str) -> Config:
    """Pre-training at test scale: test_efficientnet, 2 workers x 0.5 CPU, global batch 16,
    a log line every step, checkpoints every 10, no retries; ``extra`` overrides win."""
    return load_config(None, [
        f"data.shards={shards_path}", "data.shuffle_buffer=64", "data.decode_num_cpus=0.5",
        "model.encoder=test_efficientnet", "model.drop_path_rate=0.0", "model.proj_dim=64",
        "train.batch_size=16", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.lr=0.002",
        "train.epochs=100", "train.log_every_steps=1", "train.checkpoint_every_steps=10",
        "train.max_failures=0",
        f"storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={tracking_uri}",
        "tracking.experiment=test-pretrain", *extra,
    ])
