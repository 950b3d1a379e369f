"""Checkpoints: safetensors weights + a weights-only optimiser state + JSON metadata.

A checkpoint folder holds::

    model.safetensors   ColaModel state (encoder, head g, W); never pickled
    optimizer.pt        torch.save of the optimiser state; loaded with weights_only=True
    state.json          step, epoch, world size, global batch, the config, MLflow run id

Nothing here imports Ray: the train loop hands the folder to ``ray.train.report``,
which copies it to the run's storage path (local or s3://) and commits it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cola_ray.config import Config

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where training is; everything else is in the weights."""

    step: int = 0
    epoch: int = 0
    world_size: int = 1
    global_batch: int = 0
    mlflow_run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainState) -> Path:
    """Write the three files into ``folder`` (created); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "cola-ray/1"})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    return folder


def read_state(folder: str | Path) -> TrainState:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a cola-ray checkpoint (no {STATE_FILE}): {folder}")
    return TrainState(**json.loads(path.read_text()))


def load_checkpoint(folder: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> TrainState:
    """Load weights (strictly) and, if given, the optimiser state; return the train state."""
    folder = Path(folder)
    state = read_state(folder)
    weights = load_file(str(folder / MODEL_FILE), device="cpu")
    model.load_state_dict(weights, strict=True)
    if optimizer is not None and (folder / OPTIMIZER_FILE).is_file():
        # weights_only=True: a tampered checkpoint cannot run code here.
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return state


def load_encoder(folder: str | Path) -> torch.nn.Module:
    """The WaveformEncoder (waveform -> h) of a checkpoint, in eval mode, on CPU."""
    from cola_ray.model import ColaModel

    state = read_state(folder)
    cfg = Config.from_dict(state.config)
    model = ColaModel(cfg.features, cfg.model)
    load_checkpoint(folder, model)
    return model.encoder.eval()
