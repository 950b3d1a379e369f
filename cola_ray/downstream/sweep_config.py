"""A sweep from a YAML file (``cola-ray sweep --config``, ``jobs/sweep.py``): the probe's
sweep or fine-tuning's, picked by ``mode``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

from cola_ray.config import ConfigError, read_settings
from cola_ray.downstream.tune_runs import SweepResult, describe

__all__ = ["MODES", "describe", "load_sweep_config", "run_sweep"]

MODES = ("probe", "finetune")


def load_sweep_config(
    path: str | Path | None, overrides: Sequence[str] = (), settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`cola_ray.downstream.sweep.sweep`'s keyword arguments from YAML (``${VAR:-default}`` allowed), then
    ``key=value`` overrides (values read as YAML), then ``settings`` (e.g. CLI flags;
    None values are skipped).

    ``mode`` (``probe``, the default, or ``finetune``) picks the sweep; the other keys are
    the parameter names of :func:`cola_ray.downstream.sweep.sweep` or of
    :func:`cola_ray.downstream.finetune_sweep.finetune_sweep`. An unknown key or a missing
    ``encoder_ref`` / ``task`` is a :class:`~cola_ray.config.ConfigError` naming it.
    Run the result with :func:`run_sweep`.
    """
    data = read_settings(path, overrides)
    data.update({k: v for k, v in (settings or {}).items() if v is not None})
    mode = str(data.get("mode") or "probe")
    if mode not in MODES:
        raise ConfigError(f"sweep key 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    data["mode"] = mode
    known = set(inspect.signature(_sweep_function(mode)).parameters) | {"mode"}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} for a {mode} sweep; known keys: {', '.join(sorted(known))}")
    for key in ("encoder_ref", "task"):
        if not data.get(key):
            raise ConfigError(f"sweep key {key!r} is required")
        data[key] = str(data[key])  # a run id of digits must stay a string
    return data


def _sweep_function(mode: str) -> Any:
    if mode == "finetune":
        from cola_ray.downstream.finetune_sweep import finetune_sweep

        return finetune_sweep
    from cola_ray.downstream.sweep import sweep

    return sweep


def run_sweep(settings: Mapping[str, Any]) -> SweepResult:
    """Run :func:`load_sweep_config`'s settings: the probe's sweep or fine-tuning's."""
    settings = dict(settings)
    return _sweep_function(settings.pop("mode", "probe"))(**settings)
