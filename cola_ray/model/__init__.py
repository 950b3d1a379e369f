"""Pairs to loss, pure torch (no Ray, no MLflow): the log-mel frontend (``features``), the
timm encoder (``encoder``), collectives that degrade to one process (``distributed``), the
contrastive loss (``loss``) and :class:`ColaModel`, all of it in one module (``cola``)."""

from typing import Any

__all__ = ["ColaModel", "WaveformEncoder", "LogMel"]


def __getattr__(name: str) -> Any:
    # Lazy, so `cola_ray.model.loss` does not import timm. `cola_ray.model.ColaModel` is
    # also where the flat layout kept the class (pickles of old runs name it).
    if name == "ColaModel":
        from cola_ray.model.cola import ColaModel

        return ColaModel
    if name == "WaveformEncoder":
        from cola_ray.model.encoder import WaveformEncoder

        return WaveformEncoder
    if name == "LogMel":
        from cola_ray.model.features import LogMel

        return LogMel
    raise AttributeError(f"module 'cola_ray.model' has no attribute {name!r}")
