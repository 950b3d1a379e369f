"""Pre-training end to end on a real local Ray: 2 CPU workers, tiny shards, MLflow, resume."""

from __future__ import annotations

import os
import shutil
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cola_ray.config import ConfigError
from cola_ray.train.trainer import fit
from helpers.factories import make_shards, tiny_config as tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_shards(root, n_clips=64, seconds=2.0, seed=1, max_samples=16)


def test_pretrain_learns_logs_and_resumes(ray_local, corpus_shards, tmp_path, mlflow_server):
    cfg = tiny(tmp_path, corpus_shards, mlflow_server, "name=run-a", "train.max_steps=40")
    first = fit(cfg, echo=lambda *_: None)
    assert first.checkpoint and not first.resumed

    client = MlflowClient(mlflow_server)
    loss = [m.value for m in sorted(client.get_metric_history(first.mlflow_run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 40 and np.all(np.isfinite(loss))
    # Chance level is log(16) = 2.77 for a batch of 16; a learnable corpus must go well below.
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.3, loss
    run = client.get_run(first.mlflow_run_id)
    for key in ("contrastive_accuracy", "pairs_per_second", "data_wait_fraction", "data/good_samples"):
        assert key in run.data.metrics, key
    assert run.data.params["model.encoder"] == "test_efficientnet"
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(first.mlflow_run_id, "checkpoints")}
    assert "checkpoints/checkpoint_000000040" in artifacts

    # The encoder is an MLflow model: waveform (B, 15600) -> embedding (B, D).
    mlflow.set_tracking_uri(mlflow_server)
    encoder = mlflow.pytorch.load_model(run.data.tags["cola_ray.encoder_uri"])
    with torch.no_grad():
        h = encoder(torch.zeros(2, 15600))
    assert h.shape[0] == 2 and h.ndim == 2

    # Same run name: the step counter and the MLflow run continue.
    again = fit(tiny(tmp_path, corpus_shards, mlflow_server, "name=run-a", "train.max_steps=44"),
                echo=lambda *_: None)
    assert again.resumed and again.mlflow_run_id == first.mlflow_run_id
    steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, "loss")]
    assert sorted(steps) == list(range(1, 45)), "no step lost or logged twice"
    assert again.checkpoint.endswith("checkpoint_000000044")

    # resume=true without a name: the run whose newest checkpoint is the latest (not an older run).
    older = tmp_path / "runs" / "run-old" / "checkpoint_000000010"
    shutil.copytree(again.checkpoint, older)
    os.utime(older, (time.time() - 3600, time.time() - 3600))
    latest = fit(tiny(tmp_path, corpus_shards, mlflow_server, "resume=true", "train.max_steps=46"),
                 echo=lambda *_: None)
    assert latest.run_name == "run-a" and latest.mlflow_run_id == first.mlflow_run_id
    steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, "loss")]
    assert sorted(steps) == list(range(1, 47))
    # A resume that would change the number of negatives is refused on the driver, naming the
    # checkpoint, before any training worker starts.
    with pytest.raises(ConfigError, match="global batch") as err:
        fit(tiny(tmp_path, corpus_shards, mlflow_server, "resume=true", "train.max_steps=48", "train.batch_size=8"),
            echo=lambda *_: None)
    assert "run-a/checkpoint_000000046" in str(err.value)


def test_a_quarantined_shard_is_named_in_the_mlflow_run(ray_local, tmp_path):
    """One of three shards is cut short: training goes on with the others, and the run says
    which shard was set aside and why (a tag), and how many (a metric), not only a count.
    It is read once: later epochs skip it, and so does a resume (the checkpoint keeps it)."""
    import json

    make_shards(tmp_path, n_clips=24, seconds=2.0, seed=3, max_samples=8)
    victim = sorted((tmp_path / "shards").glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("name=quarantine", "train.batch_size=8", "data.pairs_per_clip=2",
            "train.compile=eager")  # and the compiled step runs under DDP
    result = fit(tiny(tmp_path, tmp_path / "shards", uri, *args, "train.max_steps=12"), echo=lambda *_: None)
    run = MlflowClient(uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert victim.name in run.data.tags["cola_ray.quarantined_shards"]
    assert "manifest" in run.data.tags["cola_ray.quarantined_shards"]
    assert run.data.metrics["data/quarantined_shards"] == 1.0
    assert run.data.metrics["data/bad_bad_shard"] == 1.0  # 3 epochs (4 steps each), counted once
    assert run.data.metrics["data/quarantine_skips"] >= 1.0
    state = json.loads(open(os.path.join(result.checkpoint, "state.json")).read())
    assert list(state["quarantine"]) == [victim.name]
    again = fit(tiny(tmp_path, tmp_path / "shards", uri, *args, "resume=true", "train.max_steps=20"),
                echo=lambda *_: None)
    assert again.resumed and again.mlflow_run_id == result.mlflow_run_id
    metrics = {m: [x.value for x in MlflowClient(uri).get_metric_history(again.mlflow_run_id, m)]
               for m in ("data/bad_bad_shard", "data/quarantine_skips")}
    assert set(metrics["data/bad_bad_shard"]) == {1.0}  # never read (and counted) again
    assert metrics["data/quarantine_skips"][-1] >= 1.0  # the resumed run skipped it


def test_a_time_budget_stops_every_worker_together_and_counts_across_resumes(ray_local, corpus_shards, tmp_path,
                                                                           mlflow_server):
    """train.max_minutes with the recipe options on (augmentations, running log-mel
    normalisation, bilinear scale and W's own rate, warm-up) and online evaluation: the run
    stops on time, not on epochs, at a log step, logs its evaluations, and a resume with the
    same budget trains no further."""
    from cola_ray.train.checkpoint import checkpoint_folders, read_state
    from helpers.factories import labelled_task

    task = labelled_task(tmp_path / "eval", ["chirps", "tones"], n_clips=40, name="toy-online", max_samples=20)

    opts = ["name=timed", "train.max_minutes=0.2", "train.log_every_steps=2", "train.checkpoint_every_steps=1000",
            "augment.gain_db=6", "augment.mix_prob=0.5", "augment.noise_prob=0.5", "augment.time_shift=0.1",
            "augment.freq_mask=8", "augment.time_mask=10", "features.normalize=running",
            "model.bilinear_scale=sqrt", "train.bilinear_lr=0.01", "train.warmup_steps=5",
            "eval.every_steps=8", f"eval.tasks={task / 'shards'}", "eval.probe_steps=50",
            "tracking.system_metrics_interval_s=0.5"]
    first = fit(tiny(tmp_path, corpus_shards, mlflow_server, *opts), echo=lambda *_: None)
    state = read_state(first.checkpoint)
    steps_per_epoch = 64 // 16
    assert state.train_seconds >= 12, state  # 0.2 min, measured by rank 0 from its first step
    assert state.step < 100 * steps_per_epoch and state.step % 2 == 0, state  # on time, at a log step
    loss = [m.value for m in MlflowClient(mlflow_server).get_metric_history(first.mlflow_run_id, "loss")]
    assert np.all(np.isfinite(loss)) and len(loss) == state.step // 2
    evals = MlflowClient(mlflow_server).get_metric_history(first.mlflow_run_id, "eval/toy-online/accuracy")
    assert sorted(m.step for m in evals) == list(range(8, state.step + 1, 8))
    assert all(0.0 <= m.value <= 1.0 for m in evals)  # the probe's own figures: test_online_eval.py
    # System metrics: one monitor on the node (local rank 0), under system/node_0/.
    logged = MlflowClient(mlflow_server).get_run(first.mlflow_run_id).data.metrics
    assert "system/node_0/cpu_utilization_percentage" in logged and "system/node_0/system_memory_usage_megabytes" in logged

    again = fit(tiny(tmp_path, corpus_shards, mlflow_server, *opts), echo=lambda *_: None)
    assert again.resumed
    newest = checkpoint_folders(str(tmp_path / "runs" / "timed"))[0][1]
    assert read_state(newest).step == state.step, "the budget was spent: no step after the resume"
