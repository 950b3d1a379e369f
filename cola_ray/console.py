"""What the console shows: one place for the logging policy of cola-ray's Ray internals.

Default (quiet): Ray Data's INFO chatter stays in Ray's log files (``ray-data.log``), off
the console; warnings and errors still reach it. ``--verbose`` (cola-ray CLI) or
``COLA_RAY_VERBOSE=1`` leave Ray's console logging as Ray configures it.

Knob used (verified in ray/data/_internal/logging.py of the installed Ray): the
``ray.data`` logger has a ``file`` handler (SessionFileHandler -> ray-data.log) and a
``console`` handler (``ray._private.log.PlainRayHandler``, level INFO); only the console
handler's level is raised, so the file keeps everything.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "COLA_RAY_VERBOSE"
"""``1`` (or true/yes/on): Ray internals on the console as Ray logs them."""
QUIET_LOGGERS = ("ray.data",)
"""Loggers whose console handlers are raised to WARNING when quiet."""


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
                changed[name] = handler.level
    return changed
