"""Where a run lives: ``storage_path`` turned into filesystems and folders once, on the driver.

::

    <storage_path>/                  a local folder or s3://bucket/prefix (Ray Train's storage)
      <name>/                        run_dir: one run, named by the config (or found by resume=true)
        checkpoint_<step:09d>/       what the workers restore from (checkpoint_dir)
        mlflow_spool/                rank 0's MLflow spool, when the storage is local
      _synthetic/shards/             the demo corpus of ``data.shards: synthetic``

:func:`storage_root` is the one rule for turning a ``storage_path`` into the path Ray Train
and Tune take (pre-training, fine-tuning and its sweep use it); :func:`ray_storage` adds the
pyarrow filesystem with the config's S3 endpoint; :class:`RunPaths` holds every path of one
pre-training run, and the workers get its plain fields (:meth:`RunPaths.worker_fields`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from cola_ray.config import Config, ConfigError
from cola_ray.data import storage

SYNTHETIC_SHARDS = "_synthetic/shards"
"""Where ``data.shards: synthetic`` builds its corpus, under ``storage_path``."""


def storage_root(storage_path: str) -> str:
    """``storage_path`` as Ray Train / Tune take it: an s3:// URL as given, a local path made
    absolute (Ray's workers and trials run in other working directories)."""
    return storage_path if storage.is_s3(storage_path) else os.path.abspath(storage_path)


def ray_storage(storage_path: str, endpoint_url: str = "", region: str = "") -> tuple[pafs.FileSystem, str]:
    """``(filesystem, root)`` for ``RunConfig(storage_filesystem=, storage_path=)``: S3 through
    :func:`cola_ray.data.storage.pyarrow_filesystem` (the configured endpoint; root
    ``bucket/prefix``), local a ``LocalFileSystem`` and the absolute folder, created."""
    root = storage_root(storage_path)
    if storage.is_s3(root):
        return storage.pyarrow_filesystem(root, endpoint_url, region)
    os.makedirs(root, exist_ok=True)
    return pafs.LocalFileSystem(), root


def run_name(cfg: Config, fs: pafs.FileSystem, root: str) -> str:
    """The configured name; with ``resume`` and no name, the latest run that has checkpoints
    under ``root``; else a new timestamped name."""
    if cfg.name:
        return cfg.name
    if cfg.resume:
        runs = runs_with_checkpoints(fs, root)
        if not runs:
            raise ConfigError(f"resume=true but no run with checkpoints under {cfg.storage_path!r}")
        return runs[-1]
    return time.strftime("cola-%Y%m%d-%H%M%S")


def runs_with_checkpoints(fs: pafs.FileSystem, root: str) -> list[str]:
    """Run folders under ``root`` holding a checkpoint, oldest first by latest checkpoint."""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        ckpts = [c for c in fs.get_file_info(pafs.FileSelector(info.path))
                 if os.path.basename(c.path).startswith("checkpoint_")]
        if ckpts:
            newest = max((c.mtime.timestamp() if c.mtime else 0.0) for c in ckpts)
            found.append((newest, os.path.basename(info.path)))
    return [n for _, n in sorted(found)]


@dataclass(frozen=True)
class RunPaths:
    """Every path of one pre-training run, derived once from the config on the driver."""

    name: str
    fs: pafs.FileSystem
    """Ray Train's ``RunConfig.storage_filesystem``."""
    root: str
    """Ray Train's ``RunConfig.storage_path`` on :attr:`fs`: an absolute folder, or ``bucket/prefix``."""
    run_dir: str
    """``<storage_path>/<name>`` as the user wrote ``storage_path``: printed, tagged on the MLflow run."""
    checkpoint_dir: str
    """The run's folder as the driver and the workers read its ``checkpoint_<step>`` folders
    (an s3:// URL, or an absolute path)."""
    spool_dir: str
    """Where rank 0 spools MLflow records."""

    @classmethod
    def of(cls, cfg: Config, name: str, fs: pafs.FileSystem, root: str) -> "RunPaths":
        """The paths of run ``name`` in the storage ``(fs, root)`` of :func:`ray_storage`."""
        run_dir = f"{cfg.storage_path.rstrip('/')}/{name}"
        checkpoint_dir = run_dir if storage.is_s3(run_dir) else os.path.join(root, name)
        return cls(name, fs, root, run_dir, checkpoint_dir, spool_dir(cfg, name))

    def worker_fields(self) -> dict[str, str]:
        """The plain fields the workers need (``loop_config["run"]``)."""
        return {"checkpoint_dir": self.checkpoint_dir, "spool_dir": self.spool_dir}

    def checkpoint_url(self, path: str) -> str:
        """A checkpoint path as Ray Train returns it (on :attr:`fs`) -> a URL the user can open."""
        return "s3://" + path.lstrip("/") if storage.is_s3(self.run_dir) else path


def spool_dir(cfg: Config, name: str) -> str:
    """Where rank 0 spools MLflow records: ``tracking.spool_dir``, else beside the run's
    checkpoints when they are local, else under the home folder of rank 0's node."""
    if cfg.tracking.spool_dir:
        root = cfg.tracking.spool_dir
    elif storage.is_s3(cfg.storage_path):
        root = os.path.join(os.path.expanduser("~"), ".cache", "cola-ray", "mlflow-spool")
    else:
        return os.path.join(os.path.abspath(cfg.storage_path), name, "mlflow_spool")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), name)
