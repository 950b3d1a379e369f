"""cola-ray.

``cola_ray.load_encoder(path)`` loads an encoder export (see :mod:`cola_ray.export`); it is
imported on first use, so ``import cola_ray`` stays light (no torch, Ray or MLflow).
"""

from typing import Any

__all__ = ["load_encoder"]


def __getattr__(name: str) -> Any:
    if name == "load_encoder":
        from cola_ray.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'cola_ray' has no attribute {name!r}")
