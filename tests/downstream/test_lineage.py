"""Runs that point at each other, on a real MLflow store (sqlite): downstream runs are tagged
with the pre-training run and checkpoint step they measured, and the pre-training run's note
lists them. No Ray: the runs are made directly; test_sweep.py probes a tagged checkpoint."""

from __future__ import annotations

import threading
import warnings

import pytest
from mlflow.tracking import MlflowClient

from cola_ray.downstream import notes
from cola_ray.downstream.encoders import lineage
from cola_ray.downstream.tags import (ARCHITECTURE_FROM_TAG, BASELINE_TAG, CHECKPOINT_STEP_TAG, ENCODER_KIND_TAG,
                                      ENCODER_TAG, KIND_TAG, NOTE_TAG, PRETRAIN_EXPERIMENT_TAG, PRETRAIN_RUN_NAME_TAG,
                                      PRETRAIN_RUN_TAG, TASK_TAG)
from helpers.factories import hand_made_checkpoint


@pytest.fixture
def pretrained(tmp_path):
    """A pre-training run ``cola-a`` in its own experiment, and a checkpoint of it at step 500."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("test-pretrain")
    run = client.create_run(exp, run_name="cola-a")
    ckpt = hand_made_checkpoint(tmp_path / "ckpt", step=500, mlflow_run_id=run.info.run_id)
    return {"uri": uri, "client": client, "exp": exp, "run_id": run.info.run_id, "checkpoint": ckpt,
            "downstream": client.create_experiment("test-downstream")}


def downstream_run(p, name, kind="probe", test_accuracy=None, **tags):
    client = p["client"]
    run = client.create_run(p["downstream"], run_name=name, tags={
        KIND_TAG: kind, TASK_TAG: "toy", BASELINE_TAG: "COLA frozen",
        **lineage(p["checkpoint"], tracking_uri=p["uri"]).tags(), **tags})
    if test_accuracy is not None:
        client.log_metric(run.info.run_id, "test_accuracy", test_accuracy)
    return run.info.run_id


def test_a_downstream_run_carries_the_pretraining_run_and_step_it_measured(pretrained):
    p = pretrained
    run_id = downstream_run(p, "probe-toy")
    tags = MlflowClient(tracking_uri=p["uri"]).get_run(run_id).data.tags
    assert tags[PRETRAIN_RUN_TAG] == p["run_id"]
    assert tags[PRETRAIN_RUN_NAME_TAG] == "cola-a"
    assert tags[PRETRAIN_EXPERIMENT_TAG] == p["exp"]
    assert tags[CHECKPOINT_STEP_TAG] == "500"
    assert tags[ENCODER_TAG] == p["checkpoint"]
    assert tags[ENCODER_KIND_TAG] == "checkpoint"


def test_baselines_claim_no_pretraining_run():
    for ref, kind in (("logmel", "features"), ("random:test_efficientnet", "random")):
        assert lineage(ref).tags() == {ENCODER_TAG: ref, ENCODER_KIND_TAG: kind}


def test_the_supervised_baseline_names_only_the_architecture_it_took(pretrained):
    tags = lineage(pretrained["checkpoint"], tracking_uri=pretrained["uri"], from_scratch=True).tags()
    assert tags[ARCHITECTURE_FROM_TAG] == pretrained["checkpoint"]
    assert PRETRAIN_RUN_TAG not in tags and CHECKPOINT_STEP_TAG not in tags


def test_a_checkpoint_from_another_store_keeps_its_run_id_without_a_name(pretrained, tmp_path):
    tags = lineage(pretrained["checkpoint"], tracking_uri=f"sqlite:///{tmp_path / 'other.db'}").tags()
    assert tags[PRETRAIN_RUN_TAG] == pretrained["run_id"] and tags[CHECKPOINT_STEP_TAG] == "500"
    assert PRETRAIN_RUN_NAME_TAG not in tags


def test_the_pretraining_runs_note_lists_its_downstream_runs_with_links(pretrained):
    p = pretrained
    client = p["client"]
    client.set_tag(p["run_id"], NOTE_TAG, "Baseline run, lr 2e-3.")
    probe_id = downstream_run(p, "probe-toy", test_accuracy=0.71)
    client.set_terminated(probe_id)
    notes.note_finished(client, probe_id)
    sweep_id = downstream_run(p, "sweep-toy", kind="sweep", test_accuracy=0.805)
    trial_id = downstream_run(p, "sweep-toy-trial", kind="trial", test_accuracy=0.5)
    client.set_terminated(sweep_id)
    notes.note_finished(client, sweep_id)

    note = client.get_run(p["run_id"]).data.tags[NOTE_TAG]
    assert note.startswith("Baseline run, lr 2e-3.")  # the run's own text is kept
    assert note.count(notes.BEGIN) == 1 and note.count(notes.END) == 1
    assert f"[probe-toy](#/experiments/{p['downstream']}/runs/{probe_id})" in note
    assert f"[sweep-toy](#/experiments/{p['downstream']}/runs/{sweep_id})" in note
    assert "71.0%" in note and "80.5%" in note and "| 500 |" in note and "FINISHED" in note
    assert trial_id not in note  # trials have no headline result

    client.set_tag(p["run_id"], NOTE_TAG, note + "\nAdded later by hand.")
    notes.note_finished(client, probe_id)
    again = client.get_run(p["run_id"]).data.tags[NOTE_TAG]
    assert again.count(notes.BEGIN) == 1 and again.endswith("Added later by hand.")


def test_downstream_runs_finishing_at_once_are_all_listed(pretrained):
    p = pretrained
    run_ids = [downstream_run(p, f"probe-{i}", test_accuracy=0.1 * i) for i in range(4)]
    start = threading.Barrier(len(run_ids))
    caught: list[Warning] = []

    def finish(run_id):
        client = MlflowClient(tracking_uri=p["uri"])
        client.set_terminated(run_id)
        start.wait()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            notes.note_finished(client, run_id)
        caught.extend(w)

    threads = [threading.Thread(target=finish, args=(r,)) for r in run_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not caught, [str(w.message) for w in caught]
    note = p["client"].get_run(p["run_id"]).data.tags[NOTE_TAG]
    assert all(r in note for r in run_ids)
    assert note.count("FINISHED") == 4


def test_a_note_that_cannot_be_written_warns_and_does_not_raise(pretrained):
    p = pretrained
    run_id = downstream_run(p, "probe-lost", **{PRETRAIN_RUN_TAG: "0" * 32})
    with pytest.warns(RuntimeWarning, match="pre-training run"):
        notes.note_finished(p["client"], run_id)


@pytest.mark.slow
def test_a_real_probe_is_tagged_and_listed_on_its_pretraining_run(ray_local, pretrained, tmp_path):
    from cola_ray.downstream.probe import probe
    from helpers.factories import labelled_task

    p = pretrained
    task = labelled_task(tmp_path / "task", ["tones", "chirps"], n_clips=12, name="toy-two", max_samples=6)
    result = probe(p["checkpoint"], str(task / "shards"), epochs=2, experiment="test-downstream",
                   tracking_uri=p["uri"], cache_dir=str(tmp_path / "cache"))
    client = MlflowClient(tracking_uri=p["uri"])
    tags = client.get_run(result.run_id).data.tags
    assert (tags[PRETRAIN_RUN_TAG], tags[PRETRAIN_RUN_NAME_TAG], tags[CHECKPOINT_STEP_TAG]) == (p["run_id"], "cola-a", "500")
    note = client.get_run(p["run_id"]).data.tags[NOTE_TAG]
    assert f"(#/experiments/{p['downstream']}/runs/{result.run_id})" in note
    assert f"{100 * result.test_accuracy:.1f}%" in note
