"""The downstream suite's config and its failure handling (the full suite runs as a job in
tests/test_jobs.py)."""

from __future__ import annotations


import pytest

from cola_ray.config import ConfigError
from cola_ray.downstream.suite import load_suite_config, run_suite
from helpers.factories import hand_made_checkpoint

from helpers.paths import REPO
SMOKE = REPO / "jobs" / "configs" / "downstream-smoke.yaml"


def test_suite_config_reads_sections_and_overrides(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = load_suite_config(SMOKE, ["encoder_ref=random:test_efficientnet", "probe.num_samples=5",
                                         "finetune.epoch_choices=[1, 3]", "columns=[COLA frozen]"])
    assert settings["encoder_ref"] == "random:test_efficientnet" and settings["tasks"] == ["synthetic"]
    assert settings["probe"]["num_samples"] == 5 and settings["probe"]["max_concurrent"] == 1
    assert settings["finetune"]["epoch_choices"] == [1, 3]
    assert settings["columns"] == ["COLA frozen"]


@pytest.mark.parametrize("overrides, message", [
    ([], "'encoder_ref' is required"),
    (["encoder_ref=x", "epochs=3"], "unknown suite key 'epochs'"),
    (["encoder_ref=x", "probe.epochs=3"], "unknown suite key 'probe.epochs'"),
    (["encoder_ref=x", "finetune.num_actors=2"], "unknown suite key 'finetune.num_actors'"),
    # The suite sets these per cell: a section may not.
    (["encoder_ref=x", "probe.baseline=supervised"], "unknown suite key 'probe.baseline'"),
    (["encoder_ref=x", "columns=[COLA frozen, linear]"], "columns must be among"),
])
def test_suite_config_refuses_what_it_does_not_know(overrides, message, monkeypatch):
    monkeypatch.delenv("COLA_ENCODER", raising=False)
    with pytest.raises(ConfigError, match=message):
        load_suite_config(SMOKE, overrides)


def test_unresolvable_encoder_fails_before_any_work(tmp_path):
    from cola_ray.downstream.encoders import EncoderNotFound

    # EncoderNotFound is a FileNotFoundError naming the reference it could not resolve.
    with pytest.raises(EncoderNotFound, match=r"encoder reference '.*/nope' names no file"):
        run_suite(str(tmp_path / "nope"), ["synthetic"], storage_path=str(tmp_path / "runs"),
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_failed_cell_is_named_and_the_others_go_on(ray_local, tmp_path):
    """Two tasks, one without shards: its cell fails naming the path, the other still runs,
    the report is written from what finished, and the suite raises at the end."""
    from helpers.factories import labelled_task

    encoder = hand_made_checkpoint(tmp_path / "ckpt")
    good = labelled_task(tmp_path / "good", ["tones", "chirps"], n_clips=16, name="good", max_samples=8)
    lines = []
    with pytest.raises(RuntimeError, match=r"1 cell\(s\) of the suite failed: .*missing-task / COLA frozen"):
        run_suite(encoder, [{"shards": str(tmp_path / "missing-task")}, {"shards": str(good / "shards")}],
                  columns=["COLA frozen"],
                  probe={"num_samples": 1, "epoch_choices": [2], "verbose": 0, "cache_dir": str(tmp_path / "cache")},
                  experiment="suite-failures", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                  storage_path=str(tmp_path / "runs"), report_dir=str(tmp_path / "report"), echo=lines.append)
    assert any("missing-task / COLA frozen FAILED" in line and "missing-task" in line for line in lines)
    assert any(line.startswith("[suite] good / COLA frozen: test accuracy") for line in lines)
    assert "| good |" in (tmp_path / "report" / "report.md").read_text()


def test_a_cell_counts_as_done_only_for_the_encoder_it_measured(tmp_path):
    """A suite resumed in an experiment that another encoder's suite filled skips only its
    own finished cells (and the log-mel column, which measures no encoder)."""
    from mlflow.tracking import MlflowClient

    from cola_ray.downstream.suite import _finished_cells
    from cola_ray.downstream.tags import BASELINE_TAG, ENCODER_TAG, TASK_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("suite-resume")
    for baseline, ref in (("COLA frozen", "runs:/A/encoder"), ("log-mel", "logmel"), ("random init", None),
                          ("COLA fine-tuned", "runs:/B/encoder"), ("supervised", "runs:/A/encoder")):
        tags = {TASK_TAG: "speech", BASELINE_TAG: baseline, **({ENCODER_TAG: ref} if ref else {})}
        run = client.create_run(exp, tags=tags)
        client.log_metric(run.info.run_id, "test_accuracy", 0.5)
        client.set_terminated(run.info.run_id)
    refs = {"log-mel": "logmel", "random init": "random:x", "COLA frozen": "runs:/B/encoder",
            "COLA fine-tuned": "runs:/B/encoder", "supervised": "runs:/B/encoder"}
    assert _finished_cells("suite-resume", uri, refs) == {("speech", "log-mel"), ("speech", "COLA fine-tuned")}
    assert _finished_cells("no-such-experiment", uri, refs) == set()
