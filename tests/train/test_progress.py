"""The driver's progress line (cola_ray.train.progress): rendering, the plain and live modes,
and a channel that breaks without breaking anything."""

import io
import math
import re

import pytest

from cola_ray.train import progress

FIG = {"step": 120, "total_steps": 6000, "epoch": 1, "loss": 2.3141, "contrastive_accuracy": 0.412,
       "pairs_per_second": 812.4, "data_wait_fraction": 0.031}


def test_render_names_every_figure():
    line = progress.render(FIG, {"eval/speaker_id/accuracy": 0.125, "eval/failures": 0.0},
                           elapsed_s=65, eta_s=3130)
    assert line == ("step 120/6000 (2%) | epoch 1 | loss 2.314 | acc 41.2% | 812 pairs/s | data-wait 3% | "
                    "eval speaker_id 12.5% | 1m05s, ETA 52m10s")


def test_render_leaves_out_what_is_missing():
    line = progress.render({"step": 7, "loss": math.nan}, {}, elapsed_s=3725, eta_s=None, time_budget_s=7200)
    assert line == "step 7 | 1h02m of 2h00m"


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_terminal_detection(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    assert progress.is_terminal(FakeTTY()) and not progress.is_terminal(io.StringIO())
    monkeypatch.setenv("TERM", "dumb")
    assert not progress.is_terminal(FakeTTY())


@pytest.fixture
def board(ray_local):
    b = progress.start_board()
    yield b
    ray_local.kill(b)


def _post_and_wait(board, figures, kind="train"):
    progress.post(board, figures, kind)
    import ray

    ray.get(board.since.remote(0))  # actor calls run in order: the post is in


def test_plain_mode_prints_every_post_without_control_characters(board):
    out = io.StringIO()
    printer = progress.ProgressPrinter(board, stream=out, live=False)
    for step in (2, 4, 6):
        _post_and_wait(board, {**FIG, "step": step, "total_steps": 6})
    printer.poll()  # three posts since the last poll: three lines, none lost
    _post_and_wait(board, {"eval/speaker_id/accuracy": 0.5}, kind="eval")
    printer.poll()  # an evaluation alone: the last figures again, with it
    printer.stop()
    lines = out.getvalue().splitlines()
    assert [int(re.match(r"step (\d+)/6", line).group(1)) for line in lines] == [2, 4, 6, 6]
    assert "eval speaker_id 50.0%" in lines[-1]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out.getvalue().replace("\n", ""))


def test_live_mode_rewrites_one_line_cut_to_the_terminal(board, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal
    out = FakeTTY()
    printer = progress.ProgressPrinter(board, stream=out, live=True)
    for step in (2, 4):
        _post_and_wait(board, {**FIG, "step": step, "total_steps": 6})
    printer.poll()
    printer.stop()
    text = out.getvalue()
    assert text.startswith("\rstep 4/6") and text.endswith("\x1b[K\n")  # only the newest; ended clean
    assert max(len(part.rstrip("\n\x1b[K")) for part in text.split("\r")) <= 39


def test_a_lost_board_costs_lines_not_the_run(ray_local):
    b = progress.start_board()
    ray_local.kill(b)
    out = io.StringIO()
    progress.post(b, FIG)  # fire and forget to a dead actor: no error
    printer = progress.ProgressPrinter(b, stream=out, live=False)
    assert printer.poll(timeout=5) is None
    printer.stop()
    progress.post(None, FIG)  # no board at all (a run without a driver line)
    assert out.getvalue() == ""


def test_plain_mode_holds_lines_to_its_interval_and_prints_the_last(board):
    out, now = io.StringIO(), [0.0]
    printer = progress.ProgressPrinter(board, stream=out, live=False, plain_every_s=30, clock=lambda: now[0])
    for step in (2, 4, 6):
        _post_and_wait(board, {**FIG, "step": step, "total_steps": 8})
    printer.poll()  # within one interval: the first line only
    now[0] = 31.0
    _post_and_wait(board, {**FIG, "step": 8, "total_steps": 8})
    printer.poll()  # an interval later: the next one
    _post_and_wait(board, {**FIG, "step": 8, "loss": 1.0, "total_steps": 8})
    printer.stop()  # the held last figures at the end
    steps = [re.match(r"step (\d+)/8", line).group(1) for line in out.getvalue().splitlines()]
    assert steps == ["2", "8", "8"] and "loss 1.000" in out.getvalue().splitlines()[-1]
