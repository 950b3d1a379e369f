"""What the console shows: one place for the logging policy of cola-ray's Ray internals.

Default (quiet): Ray Data's INFO chatter stays in Ray's log files (``ray-data.log``), off
the console; warnings and errors still reach it. ``--verbose`` (cola-ray CLI) or
``COLA_RAY_VERBOSE=1`` leave Ray's console logging as Ray configures it.

Three knobs, one per source (verified against the installed Ray 2.60):

- the driver's own ``ray.data`` logger: a ``file`` handler (SessionFileHandler ->
  ray-data.log) and a ``console`` handler (``PlainRayHandler``, INFO); only the console
  handler's level is raised (:func:`quiet_ray`), so the file keeps everything;
- Ray Train's controller and workers: ``RunConfig(logging_config=LoggingConfig("WARNING"))``
  (:func:`train_logging_config`), Ray Train's own switch; its system log files
  (``ray-train-sys-*.log``) keep every level;
- lines other Ray processes print (the dataset's SplitCoordinator: execution plans, "execution
  finished"; Ray's internal actors' known-harmless warnings) reach the driver through Ray's
  log forwarding; :func:`filter_worker_logs` drops the lines matching :data:`HARMLESS` there,
  on the driver only, so the processes' own files under ``/tmp/ray/session_*/logs`` keep them.
  Nothing else is dropped: errors, tracebacks and every unknown line pass.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable

VERBOSE_ENV = "COLA_RAY_VERBOSE"
"""``1`` (or true/yes/on): Ray internals on the console as Ray logs them."""
QUIET_LOGGERS = ("ray.data",)
"""Loggers whose console handlers are raised to WARNING when quiet."""
HARMLESS = tuple(re.compile(p) for p in (
    # Ray Data, once per epoch's execution (the dataset's SplitCoordinator prints them).
    r"Starting execution of Dataset ",
    r"Execution plan of Dataset ",
    r"Dataset \S+ execution finished in ",
    r"Registered dataset logger for dataset ",
    r"Progress bars disabled\. To enable",  # we disable them: MLflow and the progress line show progress
    r"Progress (bars for operators disabled|will be logged because)",
    # Ray Train 2.60 logs each worker's report under a logger named after its file, which
    # LoggingConfig does not reach: one line per rank per checkpoint.
    r"Reporting training result \d+: TrainingReport\(",
    # Ray Train 2.60's own DatasetManager passes a deprecated option (not ours to pass).
    r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated",
    r"^\s*self\.exclude_resources = exclude_resources\s*$",
    # Ray's internal actors (Ray Train's PreemptionWatcher, Ray Data's map workers) are created
    # this way; cola-ray's own actors do not restart, so the line is never about them.
    r"Actor with class name: '\S+' and ID: '\w+' has constructor arguments in the object store and max_restarts > 0",
))
"""Worker-log lines that are known harmless: dropped from the driver's console unless verbose."""


def verbose_requested(flag: bool = False) -> bool:
    """``--verbose`` given, or ``COLA_RAY_VERBOSE`` set to a true value."""
    return bool(flag) or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_ray(verbose: bool = False) -> dict[str, int]:
    """Apply the policy in this process; return ``{logger name: console level set}`` (empty when verbose).

    Only console (stream) handlers are touched; file handlers keep every record. Errors and
    warnings always reach the console.
    """
    if verbose_requested(verbose):
        return {}
    changed: dict[str, int] = {}
    for name in QUIET_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(max(handler.level, logging.WARNING))
                if not any(isinstance(f, _HarmlessFilter) for f in handler.filters):
                    handler.addFilter(_HarmlessFilter())  # e.g. "Progress bars disabled" (a warning)
                changed[name] = handler.level
    return changed


def train_logging_config(verbose: bool = False) -> Any:
    """Ray Train's ``RunConfig(logging_config=...)``: ``ray.train`` INFO lines (resource
    requests, "Reporting training result ...", "Checkpoint successfully created ...") off the
    console when quiet; warnings and errors stay."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose_requested(verbose) else "WARNING")


def harmless(line: str) -> bool:
    """Whether ``line`` matches one of :data:`HARMLESS`."""
    return any(p.search(line) for p in HARMLESS)


class _HarmlessFilter(logging.Filter):
    """Drops records whose message matches :data:`HARMLESS` (console handlers only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not harmless(record.getMessage())


_FILTER_NAME = "ray_print_logs"  # the handler ray.init(log_to_driver=True) registers


def filter_worker_logs(verbose: bool = False) -> bool:
    """Drop :data:`HARMLESS` lines from the worker logs this driver prints (True when
    installed). Wraps the handler that ``ray.init`` registered on Ray's stdstream
    dispatcher; with ``log_to_driver=False``, a verbose run, or a Ray without that hook,
    nothing changes."""
    if verbose_requested(verbose):
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its console as it is
        return False
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == _FILTER_NAME and not getattr(handler, "_cola_ray_filtered", False):
                dispatcher.handlers[i] = (name, _filtered(handler))
                return True
    return False


def _filtered(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    def handle(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not harmless(line)]
        if lines or not data.get("lines"):
            handler({**data, "lines": lines})

    handle._cola_ray_filtered = True  # type: ignore[attr-defined]
    return handle
