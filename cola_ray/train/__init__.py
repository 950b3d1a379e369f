"""Pre-training: the driver (``preflight`` checks and plans a run, ``trainer.fit`` runs it),
the loop on every Ray Train worker (``loop``), and what both use: where a run lives
(``paths``), the Ray connection and resource checks (``cluster``), MLflow (``tracking``)
and checkpoints (``checkpoint``)."""

from typing import Any

__all__ = ["fit"]


def __getattr__(name: str) -> Any:
    if name == "fit":  # lazy: importing the wing must not import Ray
        from cola_ray.train.trainer import fit

        return fit
    raise AttributeError(f"module 'cola_ray.train' has no attribute {name!r}")
