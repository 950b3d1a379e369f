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
