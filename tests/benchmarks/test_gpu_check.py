"""benchmarks/gpu_check.sh without a GPU: it parses, every step reports, and its CPU mode
runs the log-mel, pre-training (loss falling) and HEAR steps for real."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.paths import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_runs_its_cpu_pieces_and_prints_one_table():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "PRETRAIN_STEPS": "60"}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step")}
    assert set(rows) == {"cuda", "nccl", "logmel", "pretrain", "hear", "embed", "gpu_bench"}, done.stdout
    assert rows["logmel"] == rows["pretrain"] == rows["hear"] == "ok", done.stdout
    if "no CUDA GPU" in done.stdout:
        assert rows["nccl"] == rows["embed"] == rows["gpu_bench"] == "skip"
