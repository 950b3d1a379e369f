"""Exactly-once epochs (cola_ray.train.epochs, the pipeline's EpochLedger): the record's
encoding, what a resume may skip, and decode tasks leaving the skipped clips out."""

import numpy as np
import pytest

from cola_ray.config import ConfigError
from cola_ray.train import epochs
from cola_ray.train.checkpoint import TrainState, save_checkpoint
from cola_ray.train.preflight import refuse_incompatible_resume
from helpers.factories import make_shards, tiny_config


def test_encoding_round_trips_and_is_small():
    rng = np.random.default_rng(0)
    ords = np.sort(rng.choice(1_000_000, size=500_000, replace=False))
    text = epochs.encode(ords)
    assert np.array_equal(epochs.decode(text), ords)
    assert len(text) < 500_000 * 4 / 8 * 1.4  # about 2 bits a clip (+ base64), not 64
    assert np.array_equal(epochs.decode(epochs.encode(np.array([5, 3, 3, 0]))), [0, 3, 5])
    assert len(epochs.encode(np.arange(1_000_000))) < 10_000  # a whole epoch of 1M clips: ~5 kB


SHARDS = {"a.tar": "sha-a", "b.tar": "sha-b"}


def test_resume_skip_continues_refuses_or_restarts():
    record = {"a.tar": epochs.encode(np.array([0, 2])), "b.tar": epochs.encode(np.array([1]))}
    skip = epochs.resume_skip(record, SHARDS, SHARDS, "continue", "ckpt")
    assert {k: v.tolist() for k, v in skip.items()} == {"a.tar": [0, 2], "b.tar": [1]}
    # A shard changed since the save: its part of the epoch starts over (named in a warning).
    skip = epochs.resume_skip(record, SHARDS, {**SHARDS, "b.tar": "sha-b2"}, "continue", "ckpt")
    assert list(skip) == ["a.tar"]
    # Another set of shards, or a record from before exactly-once epochs: refused, naming it...
    with pytest.raises(ValueError, match=r"ckpt was trained on another set of shards.*1 missing.*'b.tar'"):
        epochs.resume_skip(record, SHARDS, {"a.tar": "sha-a", "c.tar": "x"}, "continue", "ckpt")
    with pytest.raises(ValueError, match="does not record which clips.*data.resume_epoch=restart"):
        epochs.resume_skip(None, None, SHARDS, "continue", "ckpt")
    # ... unless the user says to start the epoch over; an epoch's start has nothing to skip.
    assert epochs.resume_skip(None, None, SHARDS, "restart", "ckpt") == {}
    assert epochs.resume_skip({}, SHARDS, {"z.tar": ""}, "continue", "ckpt") == {}


def test_driver_refuses_a_checkpoint_without_a_record(tmp_path):
    import torch

    cfg = tiny_config(tmp_path, str(tmp_path / "shards"), f"sqlite:///{tmp_path / 'm.db'}")
    folder = tmp_path / "run" / "checkpoint_000000010"
    state = TrainState(step=10, epoch=1, world_size=2, global_batch=cfg.train.batch_size, config=cfg.to_dict())
    save_checkpoint(folder, torch.nn.Linear(2, 2), None, state)  # as written before exactly-once epochs
    with pytest.raises(ConfigError, match=rf"cannot resume {folder}: .*does not record which clips"):
        refuse_incompatible_resume(cfg, str(tmp_path / "run"), SHARDS)
    import dataclasses

    restart = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resume_epoch="restart"))
    refuse_incompatible_resume(restart, str(tmp_path / "run"), SHARDS)  # told to: no error


def test_decode_tasks_leave_out_what_the_ledger_lists(ray_local, tmp_path):
    import dataclasses
    import os

    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data import pipeline

    url = sorted(str(p) for p in make_shards(tmp_path, n_clips=12, seconds=1.2, seed=2, max_samples=6).glob("*.tar"))[0]
    cfg = dataclasses.asdict(DataConfig())
    every = list(pipeline.decode_and_crop({"shard": url, "shard_index": 3, "seed": 1}, cfg))
    assert [r["sample_idx"] for r in every] == list(range(6)) and {r["shard_idx"] for r in every} == {3}
    ledger = pipeline.EpochLedger.remote()
    ray.get(ledger.begin.remote(5, {os.path.basename(url): np.array([1, 4])}))
    rest = list(pipeline.decode_and_crop({"shard": url, "shard_index": 3, "seed": 1}, cfg, ledger=ledger))
    assert [r["sample_idx"] for r in rest] == [0, 2, 3, 5]
    # The clips delivered are the same ones, cut the same way (ordinals are stable read to read).
    by_idx = {r["sample_idx"]: r for r in every}
    assert all(np.array_equal(r["anchor"], by_idx[r["sample_idx"]]["anchor"]) for r in rest)
    ray.kill(ledger)


def test_an_epochs_crops_are_a_function_of_seed_epoch_and_shard(ray_local, tmp_path):
    """Through the ledger, a shard read twice in one epoch (a retried task, a resumed epoch)
    is cut the same way; another epoch or another train.seed cuts it afresh."""
    import dataclasses

    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data import pipeline

    url = sorted(str(p) for p in make_shards(tmp_path, n_clips=6, seconds=1.2, seed=3, max_samples=6).glob("*.tar"))[0]
    cfg = dataclasses.asdict(DataConfig())

    def anchors(seed, epoch):
        ledger = pipeline.EpochLedger.remote(seed=seed)
        ray.get(ledger.begin.remote(epoch, {}))
        rows = list(pipeline.decode_and_crop({"shard": url}, cfg, ledger=ledger))
        ray.kill(ledger)
        return np.stack([r["anchor"] for r in rows])

    first = anchors(7, 2)
    assert first.shape[0] == 6 and np.array_equal(first, anchors(7, 2))
    assert not np.array_equal(first, anchors(7, 3)) and not np.array_equal(first, anchors(8, 2))
    fresh = [np.stack([r["anchor"] for r in pipeline.decode_and_crop({"shard": url}, cfg)]) for _ in range(2)]
    assert not np.array_equal(*fresh)  # no ledger, no seed: new crops every read


def test_the_epoch_record_counts_device_batches_across_its_host_copies():
    """Keys stay on the device between copies (every COMPACT_EVERY steps): the counts and the
    checkpoint's record are the same as if every step had been copied at once."""
    import torch

    from cola_ray.train import epochs

    clips = epochs.EpochClips(["a.tar", "b.tar"], pairs_per_clip=1)
    clips.begin({"a.tar": np.array([0, 1])})
    steps = epochs.COMPACT_EVERY + 7
    for step in range(steps):  # batches of 4 clips of b.tar, the last step's repeated once
        ordinal = torch.arange(4 * step, 4 * step + 4) if step < steps - 1 else torch.arange(0, 4)
        clips.add(torch.ones(4, dtype=torch.int64), ordinal)
    assert len(clips.parts) < epochs.COMPACT_EVERY
    assert clips.epoch_metrics() == {"data/epoch_clips": 2.0 + 4 * (steps - 1), "data/epoch_repeats": 4.0}
    record = clips.gathered()
    assert set(record) == {"a.tar", "b.tar"}
    assert sorted(epochs.decode(record["b.tar"]).tolist()) == list(range(4 * (steps - 1)))
