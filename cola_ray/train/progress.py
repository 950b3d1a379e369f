"""Live progress on the driver: what the run is doing, at a glance.

The channel: the driver starts a :class:`ProgressBoard` actor (no CPU, on its own node) and
hands it to the workers in ``loop_config["run"]["progress"]``; world rank 0 posts its
reduced figures (already all-reduced for MLflow) at every log step with a fire-and-forget
``post.remote`` (a dead board never blocks or fails a step), and the online evaluation
posts its accuracies. :class:`ProgressPrinter`, a daemon thread in the driver, polls the
board and renders:

- on a terminal (stdout a TTY and ``TERM`` not ``dumb``): one line, rewritten in place
  (``\\r`` + clear-to-end), cut to the terminal's width;
- otherwise (``ray job logs``, CI, a file): plain lines, no control characters: the
  figures of a log step (``train.log_every_steps``) at most every ``plain_every_s``
  (``train.progress_every_s``; 0: every log step), and the last figures at the end.

A board lost with its node, or a driver restarted (which starts a new board and resumes
the run), costs lines, never training: the next post resumes the line.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, Mapping, TextIO

import ray

FIELDS = ("step", "total_steps", "epoch", "loss", "contrastive_accuracy", "pairs_per_second",
          "data_wait_fraction")
"""What rank 0 posts at each log step (``total_steps`` 0: no step limit)."""


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressBoard:
    """The figures of one run: rank 0's last :data:`KEEP` train posts, numbered, and the
    latest online-evaluation accuracies."""

    KEEP = 1000

    def __init__(self) -> None:
        self.seq = 0
        self.train: deque[tuple[int, dict[str, float]]] = deque(maxlen=self.KEEP)
        self.eval: dict[str, float] = {}

    def post(self, figures: Mapping[str, float], kind: str = "train") -> None:
        self.seq += 1
        if kind == "eval":
            self.eval.update(figures)
        else:
            self.train.append((self.seq, dict(figures)))

    def since(self, seq: int) -> dict[str, Any]:
        """``{"seq": last, "train": [figures posted after seq, oldest first], "eval": {...}}``."""
        return {"seq": self.seq, "train": [f for n, f in self.train if n > seq], "eval": dict(self.eval)}


def post(board: Any, figures: Mapping[str, float], kind: str = "train") -> None:
    """Fire and forget ``figures`` to ``board`` (None: nothing). Never raises: progress is
    a view of the run, and losing it must not lose the run."""
    if board is None:
        return
    try:
        board.post.remote({k: float(v) for k, v in figures.items()}, kind)
    except Exception:  # noqa: BLE001 - the board's node is gone, or Ray is shutting down
        pass


def start_board() -> Any:
    """A board pinned to the driver's node (:func:`cola_ray.train.cluster.on_driver_node`):
    it lives as long as the driver."""
    from cola_ray.train.cluster import on_driver_node

    return ProgressBoard.options(**on_driver_node()).remote()


def is_terminal(stream: TextIO) -> bool:
    """A live line only where a person watches a capable terminal."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def render(train: Mapping[str, float], evals: Mapping[str, float], *, elapsed_s: float,
           eta_s: float | None, time_budget_s: float = 0.0, unit: str = "step") -> str:
    """One line: ``step 120/6000 (2%) | epoch 0 | loss 2.31 | acc 41.2% | 812 pairs/s |
    data-wait 3% | eval speaker_id 12.5% | 1m05s, ETA 52m10s``. Fields absent or NaN are left
    out; ``unit`` names what ``step`` counts (``epoch`` for fine-tuning)."""
    parts = []
    step, total = int(train.get("step", 0)), int(train.get("total_steps", 0))
    parts.append(f"{unit} {step}/{total} ({step / total:.0%})" if total else f"{unit} {step}")
    if "epoch" in train:
        parts.append(f"epoch {int(train['epoch'])}")

    def num(key: str) -> float | None:
        v = train.get(key)
        return None if v is None or math.isnan(v) else float(v)

    if (v := num("loss")) is not None:
        parts.append(f"loss {v:.3f}")
    for key, label in (("contrastive_accuracy", "acc"), ("accuracy", "acc"), ("val_accuracy", "val acc")):
        if (v := num(key)) is not None:
            parts.append(f"{label} {v:.1%}")
    if (v := num("pairs_per_second")) is not None:
        parts.append(f"{v:,.0f} pairs/s")
    if (v := num("per_second")) is not None:
        parts.append(f"{v:,.1f} {unit}s/s")
    if (v := num("data_wait_fraction")) is not None:
        parts.append(f"data-wait {v:.0%}")
    for key, v in sorted(evals.items()):
        if key.endswith("/accuracy"):
            parts.append(f"eval {key.split('/')[1]} {v:.1%}")
    when = _fmt_duration(elapsed_s)
    if eta_s is not None:
        when += f", ETA {_fmt_duration(eta_s)}"
    elif time_budget_s:
        when += f" of {_fmt_duration(time_budget_s)}"
    parts.append(when)
    return " | ".join(parts)


class ProgressPrinter:
    """Poll ``board`` every ``interval_s`` in a daemon thread and print its figures to
    ``stream`` (live line on a terminal, plain lines otherwise). ``with`` starts and stops it;
    the live line is ended with a newline at the stop, so what follows starts clean."""

    def __init__(self, board: Any, *, stream: TextIO | None = None, interval_s: float = 1.0,
                 plain_every_s: float = 0.0, time_budget_s: float = 0.0, live: bool | None = None,
                 unit: str = "step", clock: Callable[[], float] = time.monotonic) -> None:
        self.unit = unit
        self.board, self.interval_s, self.time_budget_s = board, interval_s, time_budget_s
        self.plain_every_s = plain_every_s
        self._printed_at: float | None = None  # when the last plain line was printed
        self._held: tuple[Mapping[str, float], Mapping[str, float]] | None = None  # figures not printed yet
        self.stream = stream if stream is not None else sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.clock = clock
        self.started = clock()
        self.seen = 0
        self.last: Mapping[str, float] | None = None  # the last train figures shown
        self.shown = ""  # the live line now on screen ("" none)
        self._first: tuple[float, int] | None = None  # (time, step) of the first figures: the rate for the ETA
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cola-ray-progress", daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        self.poll(timeout=2)  # the last figures, if they came after the last poll
        if self._held is not None:  # plain mode: the last figures were held back by the interval
            self.show(*self._held)
        if self.live and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = ""

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll(timeout=max(self.interval_s, 2))

    def poll(self, timeout: float = 2.0) -> str | None:
        """Fetch what the board got since the last poll and print it: every train post as
        a plain line, or the newest one as the live line. Returns the last line printed."""
        try:
            new = ray.get(self.board.since.remote(self.seen), timeout=timeout)
        except Exception:  # noqa: BLE001 - a lost board or a slow one: the next poll tries again
            return None
        if new["seq"] == self.seen:
            return None
        self.seen = new["seq"]
        if not new["train"]:
            if self.last is None:
                return None
            new["train"] = [self.last]  # an evaluation result alone: the last figures with it
        line = None
        for train in (new["train"] if not self.live else new["train"][-1:]):
            now = self.clock()
            if self.live or self._printed_at is None or now - self._printed_at >= self.plain_every_s:
                line, self._printed_at, self._held = self.show(train, new["eval"]), now, None
            else:
                self._held = (train, new["eval"])
        self.last = new["train"][-1]
        return line

    def eta(self, train: Mapping[str, float]) -> float | None:
        """Seconds left at the rate since the first figures (None: no step limit or no rate yet)."""
        now, step, total = self.clock(), int(train.get("step", 0)), int(train.get("total_steps", 0))
        if self._first is None:
            self._first = (now, step)
            return None
        t0, s0 = self._first
        if not total or step <= s0 or now <= t0:
            return None
        left = (total - step) * (now - t0) / (step - s0)
        if self.time_budget_s:  # the run stops at whichever comes first
            left = min(left, max(0.0, self.time_budget_s - (now - self.started)))
        return left

    def show(self, train: Mapping[str, float], evals: Mapping[str, float]) -> str:
        line = render(train, evals, elapsed_s=self.clock() - self.started, eta_s=self.eta(train),
                      time_budget_s=self.time_budget_s, unit=self.unit)
        if self.live:
            width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
            self.stream.write("\r" + line[:width] + "\x1b[K")
            self.shown = line
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line


@contextlib.contextmanager
def shown(**printer_kwargs: Any) -> Iterator[Any]:
    """``with shown(unit=...) as board:`` a board, printed by a :class:`ProgressPrinter` while
    the block runs; at its end the last figures are printed and the board is let go."""
    board = start_board()
    try:
        with ProgressPrinter(board, **printer_kwargs):
            yield board
    finally:
        try:
            ray.kill(board)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
