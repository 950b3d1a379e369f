"""benchmarks/quality_bench.py at a tiny budget on a generated bench-shaped folder (never
the real bench: tests make their own data): the table, its columns, the MLflow record,
online evaluation of the bench's tasks, and a rerun that resumes instead of redoing."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from mlflow.tracking import MlflowClient

from cola_ray.data import synthetic
from helpers.paths import REPO

pytestmark = pytest.mark.slow


def _quality_bench():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_bench_prints_the_table_and_resumes(ray_local, tmp_path):
    bench = tmp_path / "bench"
    # The bench's layout: pretrain/*.flac unlabeled, <task>/labels.csv (path,label,split).
    synthetic.make_corpus(tmp_path / "pool", n_clips=48, seconds=2.0, seed=3)
    (bench / "pretrain").mkdir(parents=True)
    for i, clip in enumerate(sorted((tmp_path / "pool").rglob("*.flac"))):
        shutil.copy(clip, bench / "pretrain" / f"{i:03d}.flac")
    synthetic.make_corpus(bench / "toy", n_clips=40, seconds=2.0, n_classes=2, seed=4)
    qb = _quality_bench()
    lines: list[str] = []
    opts = dict(minutes=0.15, config=str(REPO / "jobs" / "configs" / "smoke.yaml"), workdir=tmp_path / "work",
                label="tiny", probe_epochs=5, online_eval=4, echo=lines.append,
                overrides=["train.max_steps=0", "train.epochs=1000", "train.checkpoint_every_steps=1000"])
    table = qb.run(bench, **opts)

    assert list(table["rows"]) == ["toy"] and set(table["rows"]["toy"]) == set(qb.COLUMNS)
    assert all(0.0 <= table["rows"]["toy"][c] <= 1.0 for c in qb.COLUMNS)  # a shape check: tiny budget
    assert table["average"] == table["rows"]["toy"] and table["steps"] and table["steps"] > 0
    text = qb.markdown(table)
    assert "| task | random init | log-mel | COLA pre-trained |" in text and "| toy |" in text
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    record = client.get_run(qb.json.loads((tmp_path / "work" / "quality-tiny.json").read_text())["table_run_id"])
    assert record.data.metrics["average/log-mel"] == table["average"]["log-mel"]
    # The bench's own tasks were evaluated online during pre-training (eval.every_steps=4).
    evals = client.get_metric_history(table["pretrain_run_id"], "eval/toy/accuracy")
    assert evals and all(m.step % 4 == 0 for m in evals)

    lines.clear()
    again = qb.run(bench, **opts)  # resumes: no pre-training, no probe redone
    assert again["rows"] == table["rows"] and not any("pre-training" in line for line in lines)
    assert not any(" test " in line for line in lines), lines
