"""The console policy (cola_ray.console): Ray's INFO chatter off the console (files untouched),
and the driver's progress line, piped and on a terminal."""

import logging
import os
import re

import pytest

from cola_ray import console
from helpers.paths import CLI, JOBS
from helpers.services import run_in_pty, run_in_session


@pytest.fixture
def ray_data_logger():
    import ray.data  # noqa: F401  (configures the ray.data logger)

    logger = logging.getLogger("ray.data")
    levels = [(h, h.level) for h in logger.handlers]
    yield logger
    for h, level in levels:
        h.setLevel(level)


def test_verbose_requested(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose_requested()
    assert console.verbose_requested(True)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose_requested()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose_requested()


def test_quiet_raises_only_console_handlers(ray_data_logger, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    before = {id(h): h.level for h in ray_data_logger.handlers}
    changed = console.quiet_ray(verbose=False)
    assert changed.get("ray.data") == logging.WARNING
    for h in ray_data_logger.handlers:
        if type(h).__name__ == "PlainRayHandler":  # Ray Data's console handler
            assert h.level >= logging.WARNING
        elif not isinstance(h, logging.StreamHandler) or type(h).__name__ == "SessionFileHandler":
            assert h.level == before[id(h)]  # files (and pytest's own handlers) untouched


def test_verbose_leaves_ray_alone(ray_data_logger, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    before = [h.level for h in ray_data_logger.handlers]
    assert console.quiet_ray(verbose=False) == {}
    assert [h.level for h in ray_data_logger.handlers] == before


# ---- the driver's console, end to end: `cola-ray pretrain` on the smoke config -----------

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # any control character but \t and \n
PROGRESS = re.compile(r"step (\d+)/12 \(\d+%\) \| epoch \d+ \| loss \d+\.\d+ \| acc [\d.]+% \| [\d,]+ pairs/s")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``(command, env)`` of a 12-step smoke pre-training with its own store and storage."""
    root = tmp_path_factory.mktemp("console")
    env = {k: v for k, v in os.environ.items() if k not in (console.VERBOSE_ENV, "RAY_ADDRESS")}
    env.update(COLA_STORAGE_PATH=str(root / "runs"), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               TERM="xterm", COLUMNS="100")
    cmd = [str(CLI), "pretrain", "--config", str(JOBS / "configs" / "smoke.yaml"),
           "train.max_steps=12", "train.log_every_steps=2", "train.checkpoint_every_steps=6",
           "train.progress_every_s=0"]
    return cmd, env


def _steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in PROGRESS.finditer(text)]


@pytest.mark.slow
def test_piped_console_is_plain_progress_without_ray_internals(smoke_run):
    cmd, env = smoke_run
    done = run_in_session(cmd, timeout=300, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    # One plain line per log step, in order, with the loss: nothing lost, no control characters.
    progress_lines = [line for line in done.stdout.splitlines() if PROGRESS.search(line)]
    assert _steps(done.stdout) == [2, 4, 6, 8, 10, 12], done.stdout
    assert not any(CONTROL.search(line) for line in progress_lines), progress_lines
    # Ray's per-epoch execution plans and per-worker report lines stay in Ray's files.
    for noise in ("Execution plan of Dataset", "Reporting training result", "Starting execution of Dataset",
                  "system_metrics_monitor"):
        assert noise not in out, noise
    assert "Done: " in done.stdout


@pytest.mark.slow
def test_terminal_console_is_one_live_line(smoke_run):
    cmd, env = smoke_run
    code, out = run_in_pty(cmd, timeout=300, env=env)
    assert code == 0, out[-3000:]
    # Rewritten in place: carriage return + clear-to-end of line, the last step shown, then a newline.
    assert "\r" in out and "\x1b[K" in out
    assert _steps(out) and _steps(out)[-1] == 12, out[-3000:]
    assert "Execution plan of Dataset" not in out


@pytest.mark.slow
def test_verbose_brings_ray_internals_back(smoke_run):
    cmd, env = smoke_run
    done = run_in_session([cmd[0], "--verbose", *cmd[1:]], timeout=300, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Execution plan of Dataset" in out
    assert "Reporting training result" in out
    assert _steps(done.stdout)[-1] == 12
