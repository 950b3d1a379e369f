"""`cola-ray demo`, the README's first command, end to end in a bounded time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [str(Path(sys.executable).parent / "cola-ray"), "demo", "--workdir", str(workdir),
           "--clips", "64", "--probe-epochs", "5", "train.epochs=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'}" in done.stdout
    # The downstream probe, random init and pre-trained side by side.
    assert "random init (mobilenetv3_small_050)" in done.stdout
    assert "COLA pre-trained (this run)" in done.stdout

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cola-ray-demo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert losses and all(m.value == m.value for m in losses)
    assert run.data.tags.get("cola_ray.encoder_uri", "").startswith("models:/")
    assert list((workdir / "runs").glob("*/checkpoint_*/model.safetensors"))
