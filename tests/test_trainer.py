"""Pre-training end to end on a real local Ray: 2 CPU workers, tiny shards, MLflow, resume."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cola_ray import shards, synthetic
from cola_ray.trainer import fit
from factories import tiny_config as tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    labels = synthetic.make_corpus(root / "clips", n_clips=64, seconds=2.0, seed=1)
    shards.build_shards(root / "clips", root / "shards", labels_csv=labels, max_samples=16, progress=False)
    return root / "shards"


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


def test_resume_true_picks_latest_run_and_refuses_other_global_batch(ray_local, corpus_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = fit(tiny(tmp_path, corpus_shards, uri, "train.max_steps=3", "train.log_every_steps=3"),
                echo=lambda *_: None)
    again = fit(tiny(tmp_path, corpus_shards, uri, "resume=true", "train.max_steps=5", "train.log_every_steps=1"),
                echo=lambda *_: None)
    assert again.run_name == first.run_name and again.mlflow_run_id == first.mlflow_run_id
    steps = sorted(m.step for m in MlflowClient(uri).get_metric_history(first.mlflow_run_id, "loss"))
    assert steps == [3, 4, 5]
    with pytest.raises(Exception, match="global batch"):
        fit(tiny(tmp_path, corpus_shards, uri, "resume=true", "train.max_steps=8", "train.batch_size=8"),
            echo=lambda *_: None)


def test_pretrain_from_s3_with_checkpoints_in_s3(ray_local, s3_bucket, tmp_path):
    """Shards read from S3 and checkpoints written to S3 (moto's server on 127.0.0.1)."""
    from cola_ray import storage

    synthetic.make_corpus(tmp_path / "clips", n_clips=24, seconds=2.0, seed=2)
    shards.build_shards(tmp_path / "clips", f"{s3_bucket}/shards", max_samples=8, progress=False)
    cfg = tiny(tmp_path, f"{s3_bucket}/shards", f"sqlite:///{tmp_path / 'mlflow.db'}",
               f"storage_path={s3_bucket}/runs", "name=s3-run", "train.max_steps=4",
               "train.checkpoint_every_steps=2", "tracking.log_checkpoints=false", "tracking.log_model=false")
    result = fit(cfg, echo=lambda *_: None)
    assert result.checkpoint == f"{s3_bucket}/runs/s3-run/checkpoint_000000004"
    files = storage.list_files(result.checkpoint, suffix="")
    assert {f.rsplit("/", 1)[1] for f in files} >= {"model.safetensors", "optimizer.pt", "state.json"}


def test_a_quarantined_shard_is_named_in_the_mlflow_run(ray_local, tmp_path):
    """One of three shards is cut short: training goes on with the others, and the run says
    which shard was set aside and why (a tag), and how many (a metric), not only a count."""
    labels = synthetic.make_corpus(tmp_path / "clips", n_clips=24, seconds=2.0, seed=3)
    shards.build_shards(tmp_path / "clips", tmp_path / "shards", labels_csv=labels, max_samples=8, progress=False)
    victim = sorted((tmp_path / "shards").glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path, tmp_path / "shards", uri, "name=quarantine", "train.batch_size=8", "train.max_steps=4",
               "data.pairs_per_clip=2",
               "train.compile=eager")  # and the compiled step runs under DDP
    result = fit(cfg, echo=lambda *_: None)
    run = MlflowClient(uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert victim.name in run.data.tags["cola_ray.quarantined_shards"]
    assert "manifest" in run.data.tags["cola_ray.quarantined_shards"]
    assert run.data.metrics["data/quarantined_shards"] == 1.0
    assert run.data.metrics["data/bad_bad_shard"] >= 1.0
