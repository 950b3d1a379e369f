"""Online evaluation's probe on real task shards (no Ray): it tells features that separate
the classes from features that do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cola_ray.config import ConfigError, FeatureConfig, load_config
from cola_ray.model.encoder import LogMelStats
from cola_ray.train.online_eval import OnlineEval
from helpers.factories import labelled_task

CLASSES = ["tones", "noise", "chirps"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return labelled_task(tmp_path_factory.mktemp("eval-task"), CLASSES, n_clips=150, name="toy-eval", max_samples=50)


class Constant(torch.nn.Module):
    """An encoder that ignores its input: the probe can only guess."""

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.ones(wave.shape[0], 8)


def test_online_probe_scores_separating_features_high_and_blind_ones_at_chance(task):
    cfg = load_config(None, ["eval.every_steps=10", f"eval.tasks={task / 'shards'}", "eval.probe_steps=200"])
    ev = OnlineEval(cfg, torch.device("cpu"))
    (loaded,) = ev.tasks
    assert loaded.classes == sorted(CLASSES) and set(loaded.split) == {"train", "test"}
    assert ev.due(20) and not ev.due(25)
    good = ev.run(LogMelStats(FeatureConfig()))["eval/toy-eval/accuracy"]
    blind = ev.run(Constant())["eval/toy-eval/accuracy"]
    n_test = int(np.sum(loaded.split == "test"))
    print(f"online eval on {n_test} test clips: log-mel statistics {good:.1%}, constant features {blind:.1%}")
    # Chance is 1/3; on ~20 test clips a guesser passes 0.63 once in a thousand runs.
    assert good >= 0.7
    assert blind <= 0.5  # one class for every clip: the share of the largest class


def test_online_eval_needs_tasks_named_in_the_error():
    with pytest.raises(ConfigError, match="eval.tasks"):
        load_config(None, ["eval.every_steps=10"])


class Broken(torch.nn.Module):
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory (pretend)")


def test_a_failing_evaluation_is_counted_and_never_raised(task):
    cfg = load_config(None, ["eval.every_steps=10", f"eval.tasks={task / 'shards'}", "eval.probe_steps=20"])
    ev = OnlineEval(cfg, torch.device("cpu"))
    assert ev.run_safely(Broken()) == {"eval/failures": 1.0}
    ok = ev.run_safely(LogMelStats(FeatureConfig()))
    assert ok["eval/failures"] == 1.0 and "eval/toy-eval/accuracy" in ok


def test_bad_eval_tasks_are_refused_before_training_naming_the_folder(task, tmp_path):
    from cola_ray.train.online_eval import check_tasks

    check_tasks(load_config(None, ["eval.every_steps=10", f"eval.tasks={task / 'shards'}"]))
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(ValueError, match=str(folder)):
            check_tasks(load_config(None, ["eval.every_steps=10", f"eval.tasks={task / 'shards'},{folder}"]))


def test_the_async_validation_task_scores_a_checkpoint_into_its_mlflow_run_and_counts_failures(task, tmp_path):
    """eval.mode=async: what Ray Train's validation task runs, on a checkpoint as training
    writes it and a real sqlite MLflow store: the figures equal the inline evaluator's on
    the same encoder, land at the checkpoint's step, and a broken task is counted, not raised."""
    import ray.train
    from mlflow.tracking import MlflowClient

    from cola_ray.train.checkpoint import load_encoder
    from cola_ray.train.online_eval import validate_checkpoint
    from helpers.factories import hand_made_checkpoint

    folder = hand_made_checkpoint(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("online")).info.run_id
    run = {"tracking_uri": uri, "mlflow_run_id": run_id}
    opts = ["eval.every_steps=7", "eval.probe_steps=50", "eval.num_cpus=1"]
    cfg = load_config(None, [*opts, f"eval.tasks={task / 'shards'}"])

    got = validate_checkpoint(ray.train.Checkpoint.from_directory(folder), step=7, config=cfg.to_dict(), run=run)
    want = OnlineEval(cfg, torch.device("cpu")).run(load_encoder(folder))
    assert got["eval/toy-eval/accuracy"] == want["eval/toy-eval/accuracy"] and got["eval/failures"] == 0.0
    (logged,) = client.get_metric_history(run_id, "eval/toy-eval/accuracy")
    assert (logged.step, logged.value) == (7, got["eval/toy-eval/accuracy"])

    broken = load_config(None, [*opts, f"eval.tasks={tmp_path / 'gone'}"]).to_dict()
    for n, step in ((1, 14), (2, 21)):
        out = validate_checkpoint(ray.train.Checkpoint.from_directory(folder), step=step, config=broken, run=run)
        assert out == {"eval/failures": float(n)}
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "eval/failures"), key=lambda m: m.step)] \
        == [(7, 0.0), (14, 1.0), (21, 2.0)]


def test_async_evaluation_options_are_checked():
    for bad in ("eval.mode=later", "eval.num_cpus=-1", "eval.timeout_s=-5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_labelled_shards_without_task_json_are_checked_by_their_samples(task, tmp_path):
    """Shards built with labels (``cola-ray shards build --labels``, the demo's) have no
    task.json: the pre-flight reads their samples' json to find the splits."""
    import shutil

    from cola_ray.data import shards, synthetic
    from cola_ray.train.online_eval import check_tasks

    plain = tmp_path / "plain"
    shutil.copytree(task / "shards", plain)
    (plain / "task.json").unlink()
    check_tasks(load_config(None, ["eval.every_steps=10", f"eval.tasks={plain}"]))

    corpus = tmp_path / "corpus"
    synthetic.make_corpus(corpus, n_clips=8, seed=0)
    rows = (corpus / "labels.csv").read_text().splitlines()
    (corpus / "train-only.csv").write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + ",train" for r in rows[1:]]))
    shards.build_shards(corpus, tmp_path / "train-only", labels_csv=corpus / "train-only.csv", max_samples=4)
    with pytest.raises(ValueError, match=f"{tmp_path / 'train-only'} has no test split"):
        check_tasks(load_config(None, ["eval.every_steps=10", f"eval.tasks={tmp_path / 'train-only'}"]))


def test_tasks_that_share_a_name_are_named_after_their_folders(task, tmp_path):
    import shutil

    for folder in ("voices", "words"):
        shutil.copytree(task / "shards", tmp_path / folder)  # both task.json say "toy-eval"
    cfg = load_config(None, ["eval.every_steps=10", "eval.probe_steps=20",
                             f"eval.tasks={tmp_path / 'voices'},{tmp_path / 'words'}"])
    out = OnlineEval(cfg, torch.device("cpu")).run(LogMelStats(FeatureConfig()))
    assert {"eval/voices/accuracy", "eval/words/accuracy"} <= set(out)
