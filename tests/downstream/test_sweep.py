"""Downstream end to end on a real local Ray: embed, probe, a Tune sweep, the report table.

One tiny labelled task (40 synthetic clips of 1.5 s, 4 classes) is embedded once per
encoder and shared by every test here through the embeddings cache. A second sweep, of
the log-mel features on a task whose classes differ only in frequency
(:func:`helpers.factories.tone_task`), must learn it.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cola_ray.data.audio import decode_audio
from cola_ray.config import ConfigError
from cola_ray.downstream.embed import load_embeddings, read_meta, split_segments
from cola_ray.downstream.encoders import resolve_encoder
from cola_ray.downstream.probe import cached_embeddings, evaluate, probe, train_probe
from cola_ray.downstream.report import report
from cola_ray.downstream.sweep import sweep
from cola_ray.downstream.sweep_config import load_sweep_config
from helpers.factories import labelled_task, logged_probe_accuracy, tone_task
from helpers.paths import CONFIGS

CLASSES = ["tones", "noise", "clicks", "chirps"]  # task.json order, deliberately not sorted
EXPERIMENT = "test-downstream"
SWEEP_YAML = CONFIGS / "sweep.yaml"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return labelled_task(tmp_path_factory.mktemp("task"), CLASSES, n_clips=40, name="toy-sounds", max_samples=10)


@pytest.mark.slow
def test_embed_every_segment_with_the_frozen_encoder(ray_local, task, checkpoint, store):
    path = cached_embeddings(checkpoint, str(task / "shards"), cache_dir=store["cache"], batch_size=16)
    emb = load_embeddings(path)
    meta = read_meta(path)
    # 1.5 s = 24000 samples: segment [0, 15600) and one aligned to the clip's end.
    assert meta["clips"] == 40 and meta["segments"] == 80 and meta["task"] == "toy-sounds"
    assert emb["h"].shape == (80, meta["dim"]) and emb["h"].dtype == np.float32
    assert sorted(set(emb["start"].tolist())) == [0, 24000 - 15600]
    assert emb["classes"].tolist() == CLASSES
    assert all(CLASSES[i] == lab for i, lab in zip(emb["label_index"], emb["label"]))
    assert set(emb["split"]) == {"train", "validation", "test"}

    # The same numbers as the encoder applied by hand to the L2-normalised segments.
    rows = np.flatnonzero(emb["clip"] == "tones__clip_00001")
    wave, _, _ = decode_audio((task / "clips" / "tones" / "clip_00001.flac").read_bytes(), 16000)
    segments, _ = split_segments(wave, 15600)
    encoder, info = resolve_encoder(checkpoint)
    assert info["kind"] == "checkpoint"
    with torch.no_grad():
        want = encoder(torch.from_numpy(segments)).numpy()
    np.testing.assert_allclose(emb["h"][rows], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    # Cached: the same folder comes back without recomputing.
    parquet = f"{path}/embeddings.parquet"
    stamp = (read_meta(path), os.stat(parquet).st_mtime_ns)
    assert cached_embeddings(checkpoint, str(task / "shards"), cache_dir=store["cache"]) == path
    assert (read_meta(path), os.stat(parquet).st_mtime_ns) == stamp


@pytest.fixture(scope="module")
def swept(ray_local, task, store):
    result = sweep("random:test_efficientnet", str(task / "shards"), num_samples=4, max_concurrent=2,
                   lr_range=(1e-2, 1.0), epoch_choices=(8, 16), grace_period=4, cpus_per_trial=0.5,
                   experiment=EXPERIMENT, tracking_uri=store["uri"], cache_dir=store["cache"],
                   storage_path=store["runs"], verbose=0)
    return result


@pytest.mark.slow
def test_sweep_selects_on_validation_and_reports_test_once(swept, store):
    client = MlflowClient(store["uri"])
    parent = client.get_run(swept.run_id)
    assert parent.info.status == "FINISHED"
    tags, metrics, params = parent.data.tags, parent.data.metrics, parent.data.params
    assert tags["cola_ray.task"] == "toy-sounds" and tags["cola_ray.baseline"] == "random init"
    assert tags["cola_ray.kind"] == "sweep"
    assert metrics["test_accuracy"] == pytest.approx(swept.test_accuracy)
    assert metrics["test_clips"] == 8 and metrics["val_clips"] == 8
    # The reported test accuracy is the logged layer's on the test clips of the embeddings ...
    assert logged_probe_accuracy(client, swept.run_id, "test") == pytest.approx(swept.test_accuracy)
    assert logged_probe_accuracy(client, swept.run_id, "validation") == pytest.approx(swept.val_accuracy)
    # ... and that layer is the best config trained again: the same numbers once more.
    emb = load_embeddings(swept.embeddings)
    again, _ = train_probe(emb, **swept.best_config)
    assert evaluate(again, emb, "test")["accuracy"] == pytest.approx(swept.test_accuracy)

    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{swept.run_id}'")
    assert len(children) == 4 == len(swept.trials)
    assert {c.info.status for c in children} == {"FINISHED"}
    # Parent and trials name the encoder they measured; a random init names no pre-training run.
    for run in (parent, *children):
        assert run.data.tags["cola_ray.model.encoder"] == "random:test_efficientnet"
        assert run.data.tags["cola_ray.encoder.kind"] == "random"
        assert "cola_ray.pretrain.run_id" not in run.data.tags
    for child in children:
        assert not any(k.startswith("test") for k in child.data.metrics), "test is reported once, on the parent"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, len(history) + 1))
        assert child.data.tags["cola_ray.early_stopped"] in ("true", "false")

    # The selected trial has the best final validation accuracy of all trials ...
    best = client.get_run(tags["cola_ray.best_trial_run_id"])
    assert best.data.tags["cola_ray.selected"] == "true"
    assert best.data.metrics["val_accuracy"] == max(c.data.metrics["val_accuracy"] for c in children)
    assert float(params["best_lr"]) == pytest.approx(float(best.data.params["lr"]))
    assert swept.best_config["lr"] == pytest.approx(float(best.data.params["lr"]))
    # ... and retraining its config on the driver gives back the trial's layer.
    assert metrics["val_loss"] == pytest.approx(best.data.metrics["val_loss"], rel=1e-4)
    assert int(params["best_epochs"]) == len(client.get_metric_history(best.info.run_id, "val_accuracy"))

    evaluation = {a.path for a in client.list_artifacts(swept.run_id, "evaluation")}
    assert "evaluation/confusion_test.csv" in evaluation
    assert {a.path for a in client.list_artifacts(swept.run_id, "probe")} == {"probe/probe.safetensors"}


@pytest.mark.slow
def test_probe_sweep_learns_a_task_of_tones(ray_local, store, tmp_path):
    """Log-mel statistics + the probe sweep on 4 classes of tones in separate frequency bands.

    20 test clips (5 per class): chance is 1/4 (a label-blind probe scores 5/20); a uniform
    guesser reaches 15/20 with probability 3.8e-6. The sweep is deterministic (seeded trials,
    fixed embeddings) and scores 1.0 here.
    """
    tones = tone_task(tmp_path / "tones")
    experiment = "test-downstream-tones"
    result = sweep("logmel", str(tones), num_samples=2, max_concurrent=2, lr_range=(1e-2, 1e-1),
                   epoch_choices=(60,), grace_period=60, cpus_per_trial=0.5, experiment=experiment,
                   tracking_uri=store["uri"], cache_dir=store["cache"], storage_path=store["runs"], verbose=0)
    client = MlflowClient(store["uri"])
    parent = client.get_run(result.run_id)
    assert parent.data.tags["cola_ray.baseline"] == "log-mel" and parent.data.tags["cola_ray.task"] == "tones-by-band"
    assert parent.data.metrics["test_clips"] == 20 and parent.data.metrics["val_clips"] == 12
    assert result.test_accuracy >= 0.75, result
    assert logged_probe_accuracy(client, result.run_id, "test") == pytest.approx(result.test_accuracy)
    # Every trial learned as well (validation: 12 clips, chance 1/4; 9/12 by guessing: p = 3.9e-4;
    # the two trials score 10/12 and 11/12).
    assert all(t["val_accuracy"] >= 0.75 for t in result.trials), result.trials


@pytest.mark.slow
def test_report_builds_the_paper_table(swept, task, checkpoint, store, tmp_path):
    frozen = probe(checkpoint, str(task / "shards"), epochs=10, lr=0.1, experiment=EXPERIMENT,
                   tracking_uri=store["uri"], cache_dir=store["cache"])
    client = MlflowClient(store["uri"])
    assert client.get_run(frozen.run_id).data.tags["cola_ray.baseline"] == "COLA frozen"
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id

    def logged(task_name, baseline, accuracy, start_time=None):
        run = client.create_run(exp, start_time=start_time,
                                tags={"cola_ray.task": task_name, "cola_ray.baseline": baseline})
        client.log_metric(run.info.run_id, "test_accuracy", accuracy)
        client.set_terminated(run.info.run_id, "FINISHED")

    logged("toy-sounds", "random init", 0.99, start_time=1000)  # older than the sweep: not the cell
    logged("zz-other", "random init", 0.5)

    r = report(EXPERIMENT, tmp_path / "report", tracking_uri=store["uri"])
    assert r.tasks == ["toy-sounds", "zz-other"]
    assert r.baselines == ["random init", "COLA frozen"]  # the paper's column order
    assert r.cells["toy-sounds", "random init"].accuracy == pytest.approx(100 * swept.test_accuracy)
    assert r.cells["toy-sounds", "random init"].run_id == swept.run_id
    assert r.cells["toy-sounds", "COLA frozen"].accuracy == pytest.approx(100 * frozen.test_accuracy)
    assert ("zz-other", "COLA frozen") not in r.cells
    assert r.average["random init"] == pytest.approx((100 * swept.test_accuracy + 50.0) / 2)
    assert r.average["COLA frozen"] == pytest.approx(100 * frozen.test_accuracy)

    rows = list(csv.reader(open(r.files["csv"])))
    assert rows[0] == ["task", "random init", "COLA frozen"]
    assert rows[2] == ["zz-other", "50.00", ""]
    assert rows[3][0] == "Average" and float(rows[3][1]) == pytest.approx(r.average["random init"], abs=0.01)
    md = open(r.files["markdown"]).read()
    assert f"| toy-sounds | {100 * swept.test_accuracy:.1f} | {100 * frozen.test_accuracy:.1f} |" in md
    assert "| zz-other | 50.0 | – |" in md and "(1/2 tasks)" in md
    logged_files = {a.path for a in client.list_artifacts(r.run_id, "report")}
    assert {"report/report.md", "report/report.csv"} <= logged_files
    assert ("png" in r.files) == ("report/report.png" in logged_files)


def test_sweep_yaml_reads_the_environment_and_refuses_unknown_keys(monkeypatch):
    monkeypatch.setenv("COLA_ENCODER", "random:efficientnet_b0")
    monkeypatch.setenv("COLA_TASK", "s3://bucket/tasks/spc1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_sweep_config(SWEEP_YAML, ["num_samples=3", "epoch_choices=[5, 10]"],
                                 {"max_concurrent": 1, "experiment": None})
    assert settings["encoder_ref"] == "random:efficientnet_b0" and settings["task"] == "s3://bucket/tasks/spc1"
    assert settings["num_samples"] == 3 and settings["epoch_choices"] == [5, 10]
    assert settings["max_concurrent"] == 1 and settings["experiment"] == "cola-ray-downstream"
    assert settings["tracking_uri"] == "sqlite:////tmp/cola-ray/mlflow.db"
    assert settings["mode"] == "probe"
    with pytest.raises(ConfigError, match="unknown key 'epochs' for a probe sweep"):
        load_sweep_config(SWEEP_YAML, ["epochs=5"])
    # Fine-tuning's sweep takes its own keys, and refuses the probe's embedding ones.
    tuned = load_sweep_config(SWEEP_YAML, ["mode=finetune", "from_scratch=true", "num_workers=2"])
    assert tuned["mode"] == "finetune" and tuned["from_scratch"] is True and tuned["num_workers"] == 2
    with pytest.raises(ConfigError, match="unknown key 'from_scratch' for a probe sweep"):
        load_sweep_config(SWEEP_YAML, ["from_scratch=true"])
    with pytest.raises(ConfigError, match="'mode' must be one of probe, finetune"):
        load_sweep_config(SWEEP_YAML, ["mode=grid"])
    monkeypatch.delenv("COLA_TASK")
    with pytest.raises(ConfigError, match="'task' is required"):
        load_sweep_config(SWEEP_YAML)
