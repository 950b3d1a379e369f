"""Checkpoints: safetensors weights + a weights-only optimiser state + JSON metadata.

A checkpoint folder holds::

    model.safetensors   ColaModel state (encoder, head g, W); never pickled
    optimizer.pt        torch.save of the optimiser state; loaded with weights_only=True
    state.json          step, epoch, world size, global batch, the config, MLflow run id,
                        and "files": the size and sha256 of the two files above

A save is atomic: the files are written and fsynced in a hidden sibling folder
``.<name>.tmp-<id>``, which is then renamed onto ``<name>`` (on Linux an existing folder
is swapped in one step with ``renameat2(RENAME_EXCHANGE)``), so a reader sees the old
checkpoint or the new one, never a mix, and a save killed at any point leaves the
previous checkpoint as it was (and at most a hidden ``.tmp`` folder). A load checks
every file it reads against ``state.json`` before it touches the model, so a folder
copied in part (an interrupted upload) or altered is refused naming the file, and
nothing is loaded from it; ``optimizer.pt`` is only ever read with ``weights_only=True``.

Nothing here imports Ray: the train loop hands the folder to ``ray.train.report``,
which copies it to the run's storage path (local or s3://) and commits it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cola_ray.config import Config

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: incomplete, altered, or carrying code."""


@dataclass
class TrainState:
    """Where training is; everything else is in the weights."""

    step: int = 0
    epoch: int = 0
    world_size: int = 1
    global_batch: int = 0
    mlflow_run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    """Wall time spent training so far, resumes included (``train.max_minutes`` counts it)."""
    epoch_clips: dict[str, str] | None = None
    """The clips the epoch in progress has trained on, per shard file name (encoded ordinals,
    :mod:`cola_ray.train.epochs`); None in checkpoints from before exactly-once epochs."""
    data_shards: dict[str, str] | None = None
    """The run's shards: file name -> manifest sha256 ("" without a manifest)."""
    quarantine: dict[str, dict[str, str]] = field(default_factory=dict)
    """Shards quarantined so far in the run: name -> ``{"reason", "version"}`` (the manifest
    entry they failed against); a resumed run skips them until that entry changes."""


def save_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainState) -> Path:
    """Write the checkpoint into ``folder`` atomically (replacing one there); returns it.

    A failed write (disk full, quota, I/O error) raises ``OSError`` naming ``folder``,
    removes the partial files and leaves whatever was at ``folder`` untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        files = {MODEL_FILE: save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            metadata={"format": "cola-ray/1"})}
        if optimizer is not None:
            buf = io.BytesIO()
            torch.save(optimizer.state_dict(), buf)
            files[OPTIMIZER_FILE] = buf.getvalue()
        for name, data in files.items():
            _write_synced(tmp / name, data)
        digests = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                   for name, data in files.items()}
        # state.json goes last: it is what makes a folder a checkpoint.
        _write_synced(tmp / STATE_FILE, json.dumps({**asdict(state), "files": digests}, indent=1).encode())
        _fsync_dir(tmp)
        _commit(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"checkpoint {folder} not saved ({e.strerror or e}); "
                               "what was there before is untouched") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_state(folder: str | Path) -> TrainState:
    """The train state of a checkpoint folder (``FileNotFoundError`` if it is not one)."""
    state, _ = _read_state(Path(folder))
    return state


def checkpoint_folders(run_dir: str, endpoint_url: str = "", region: str = "") -> list[tuple[int, str]]:
    """``(step, folder)`` of every ``checkpoint_<step>`` under ``run_dir`` (local or s3://)
    that has its ``state.json`` (written last), newest first; [] when there is none."""
    from cola_ray.data import storage

    try:
        states = storage.list_files(run_dir, STATE_FILE, endpoint_url, region)
    except FileNotFoundError:
        return []
    found = []
    for url in states:
        folder = url.rsplit("/", 1)[0]
        m = re.fullmatch(r"checkpoint_(\d+)", folder.rsplit("/", 1)[-1])
        if m:
            found.append((int(m.group(1)), folder))
    return sorted(found, reverse=True)


def read_state_at(folder: str, endpoint_url: str = "", region: str = "") -> TrainState:
    """:func:`read_state` of a folder that may be in S3 (reads ``state.json`` only)."""
    from cola_ray.data import storage

    url = f"{folder.rstrip('/')}/{STATE_FILE}"
    state, _ = _parse_state(storage.read_bytes(url, endpoint_url, region), url)
    return state


def load_checkpoint(folder: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> TrainState:
    """Load weights (strictly) and, if given, the optimiser state; return the train state.

    Every file is read and checked (size and sha256 from ``state.json``) before the model
    or the optimiser is changed, so a failed load changes nothing. Raises
    :class:`CheckpointError` naming the file for a missing, incomplete or altered file, or
    an ``optimizer.pt`` that is not weights-only (a pickle that would run code).
    """
    folder = Path(folder)
    state, digests = _read_state(folder)
    try:
        weights = load_safetensors(_read_checked(folder / MODEL_FILE, digests))
    except SafetensorError as e:
        raise CheckpointError(f"{folder / MODEL_FILE} is not a valid safetensors file: {e}") from None
    optimizer_state = None
    if optimizer is not None and ((folder / OPTIMIZER_FILE).is_file() or OPTIMIZER_FILE in digests):
        data = _read_checked(folder / OPTIMIZER_FILE, digests)
        try:
            # weights_only=True: a tampered checkpoint cannot run code here.
            optimizer_state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"{folder / OPTIMIZER_FILE} refused: not a weights-only torch file "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    model.load_state_dict(weights, strict=True)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)  # type: ignore[union-attr]
    return state


def load_encoder(folder: str | Path) -> torch.nn.Module:
    """The WaveformEncoder (waveform -> h) of a checkpoint, in eval mode, on CPU."""
    from cola_ray.model.cola import ColaModel

    state = read_state(folder)
    cfg = Config.from_dict(state.config)
    model = ColaModel(cfg.features, cfg.model)
    load_checkpoint(folder, model)
    return model.encoder.eval()


def check_resume(restored: TrainState, cfg: Config, world: int) -> None:
    """Raise ``ValueError`` if resuming ``restored`` with ``cfg`` on ``world`` workers would
    change the number of negatives.

    The number of negatives is the global batch (gathered) or the per-worker batch (not
    gathered): a resume must not change it silently. Another world size is fine when
    negatives are gathered: the per-worker batch follows, the objective stays. The driver
    checks it before any worker starts (:mod:`cola_ray.train.preflight`), every worker
    again on each restore.
    """
    if restored.global_batch and restored.global_batch != cfg.train.batch_size:
        raise ValueError(
            f"checkpoint at step {restored.step} was trained with global batch "
            f"{restored.global_batch}; this run asks for train.batch_size={cfg.train.batch_size}. "
            "The global batch sets the number of negatives: keep it, and change train.num_workers "
            "(the per-worker batch follows) if you need a different world size"
        )
    was_gathered = restored.config.get("model", {}).get("gather_negatives", True)
    before = restored.global_batch // max(1, restored.world_size) if not was_gathered else restored.global_batch
    now = cfg.per_worker_batch if not cfg.model.gather_negatives else cfg.train.batch_size
    if restored.global_batch and before != now:
        raise ValueError(
            f"checkpoint at step {restored.step} was trained with {before} pairs per softmax "
            f"({restored.world_size} workers, model.gather_negatives={was_gathered}); this run would use "
            f"{now} ({world} workers, model.gather_negatives={cfg.model.gather_negatives}). The number "
            "of negatives is the objective: resume with the same world size, or gather negatives"
        )


# ---- reading -------------------------------------------------------------------------

def _read_state(folder: Path) -> tuple[TrainState, dict[str, dict[str, Any]]]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a cola-ray checkpoint (no {STATE_FILE}): {folder}")
    return _parse_state(path.read_bytes(), path)


def _parse_state(data: bytes, where: str | Path) -> tuple[TrainState, dict[str, dict[str, Any]]]:
    """``state.json`` bytes -> (train state, file digests); ``where`` names it in errors."""
    try:
        raw = json.loads(data)
        digests = raw.pop("files", {})  # absent in checkpoints from before digests
        return TrainState(**raw), digests
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where} is not a valid checkpoint state: {e}") from None


def _read_checked(path: Path, digests: dict[str, dict[str, Any]]) -> bytes:
    """The bytes of ``path``, checked against its digest in state.json when there is one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"incomplete checkpoint: {path} is missing") from None
    want = digests.get(path.name)
    if want is not None:
        if len(data) != want["bytes"]:
            raise CheckpointError(f"incomplete or altered checkpoint: {path} has {len(data)} bytes, "
                                  f"{STATE_FILE} says {want['bytes']}")
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise CheckpointError(f"altered checkpoint: the sha256 of {path} differs from {STATE_FILE}'s")
    return data


# ---- writing -------------------------------------------------------------------------

def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, folder: Path) -> None:
    """Make ``tmp`` (complete, synced) appear at ``folder`` in one step, then drop the old one."""
    try:
        os.rename(tmp, folder)  # atomic when nothing (or an empty folder) is there
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _exchange(tmp, folder):
            shutil.rmtree(tmp)  # now the old checkpoint
        else:
            # No atomic swap on this platform: the old one steps aside first; a crash in
            # between leaves it whole under a hidden name.
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
    _fsync_dir(folder.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the filesystem cannot swap
    raise OSError(err, os.strerror(err), str(b))
