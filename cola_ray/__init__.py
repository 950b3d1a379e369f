"""cola-ray: COLA pre-training and evaluation of audio encoders on Ray.

The package reads in the order the data flows; a module imports only from its own wing
or from wings above it in this list (checked by ``tests/test_layout.py``):

    config.py      nested dataclasses for every stage, loaded from YAML + overrides
    data/          bytes -> pairs: storage, audio, shards, cache, pipeline (Ray Data), tasks
    model/         pairs -> loss: features (log-mel), encoder (timm), loss, ColaModel
    train/         the worker loop, the driver (pre-flight, fit), cluster, tracking, checkpoints
    downstream/    every use of a trained encoder: resolve, embed, probe, fine-tune, sweeps, export
    cli.py, demo.py

``cola_ray.load_encoder(path)`` loads an encoder export (see
:mod:`cola_ray.downstream.export`); it is imported on first use, so ``import cola_ray``
stays light (no torch, Ray or MLflow).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

__all__ = ["load_encoder"]

# Module paths of the flat layout (before the wings), still importable: HEAR's validator
# and users' scripts name ``cola_ray.hear``, and pickles written before the move name the
# classes' old modules. Each name is the new module itself, not a copy.
_MOVED = {
    "storage": "data.storage", "audio": "data.audio", "shards": "data.shards", "cache": "data.cache",
    "pipeline": "data.pipeline", "synthetic": "data.synthetic", "tasks": "data.tasks",
    "features": "model.features", "encoder": "model.encoder", "loss": "model.loss",
    "distributed": "model.distributed",
    "train_loop": "train.loop", "trainer": "train.trainer", "cluster": "train.cluster",
    "tracking": "train.tracking", "checkpoint": "train.checkpoint",
    "encoders": "downstream.encoders", "embed": "downstream.embed", "probe": "downstream.probe",
    "finetune": "downstream.finetune", "sweep": "downstream.sweep",
    "finetune_sweep": "downstream.finetune_sweep", "report": "downstream.report",
    "suite": "downstream.suite", "export": "downstream.export", "hear": "downstream.hear",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import cola_ray.<old>`` binds the module at its new path under the old name too."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        prefix, _, old = fullname.partition(".")
        if prefix != __name__ or old not in _MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{_MOVED[spec.name.split('.', 1)[1]]}")

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name == "load_encoder":
        from cola_ray.downstream.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'cola_ray' has no attribute {name!r}")
