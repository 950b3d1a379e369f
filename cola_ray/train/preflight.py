"""Everything that can fail a pre-training run, checked on the driver before any worker starts.

:func:`preflight` runs the checks in this order and returns the :class:`RunPlan` that
:func:`cola_ray.train.trainer.fit` runs::

    cfg.validate()                      cross-field config errors, naming the field
    S3 endpoint reachable               when shards or storage are s3:// (a TCP probe)
    data.shards resolved and listed     ``synthetic`` built once; a missing path or bucket named
    eval.tasks are task folders         with train and eval.split clips (online evaluation)
    MLflow server reachable             http(s) tracking URIs (a /health probe)
    Ray address reachable               a TCP probe: ``ray.init`` alone waits forever on a dead head
    run name                            the configured one, resume=true's latest run, or a new one
    resume compatible                   the newest checkpoint must keep the number of negatives, and
                                        account for its epoch's clips (exactly-once epochs)
    connect to Ray, check resources     every worker and decode task fits on some node

Bad input fails within seconds, naming the setting, instead of after minutes of client
retries or a placement group that waits forever. Nothing here starts a worker, builds the
dataset or opens the MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from cola_ray.config import Config, ConfigError
from cola_ray.data.pipeline import list_shards
from cola_ray.data.synthetic import SYNTHETIC, ensure_synthetic_shards
from cola_ray.train import cluster, tracking
from cola_ray.data.shards import read_manifest
from cola_ray.train.checkpoint import CheckpointError, check_resume, checkpoint_folders, read_state_at
from cola_ray.train.epochs import resume_skip, shard_versions
from cola_ray.train.paths import SYNTHETIC_SHARDS, RunPaths, ray_storage, run_name

@dataclass(frozen=True)
class RunPlan:
    """A checked run, ready for ``fit``: Ray is connected and can host it."""

    cfg: Config
    """The config with ``data.shards`` resolved (``synthetic`` -> the built corpus)."""
    urls: list[str]
    """The shard files, listed once."""
    paths: RunPaths
    """Where the run, its checkpoints and its MLflow spool are."""
    shard_versions: dict[str, str]
    """Shard file name -> manifest sha256 ("" without one): what a resumed epoch checks
    its record against (:mod:`cola_ray.train.epochs`)."""


def preflight(cfg: Config, echo: Callable[[str], None] = print) -> RunPlan:
    """Check ``cfg`` against the services and storage it names, then connect to Ray and
    check its resources; raises ``ConfigError`` / ``ConnectionError`` / ``ResourceError``
    naming the setting. Returns the plan ``fit`` runs."""
    cfg.validate()
    cluster.check_s3_endpoint(cfg)
    cfg = resolve_shards(cfg, echo)
    urls = list_shards(cfg.data)
    versions = shard_versions(urls, _manifest(cfg))
    if cfg.eval.every_steps:
        from cola_ray.train.online_eval import check_tasks

        try:
            check_tasks(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    tracking.check_server(tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
    cluster.check_ray_address(cfg.ray_address)
    fs, root = ray_storage(cfg.storage_path, cfg.data.s3_endpoint_url, cfg.data.s3_region)
    paths = RunPaths.of(cfg, run_name(cfg, fs, root), fs, root)
    refuse_incompatible_resume(cfg, paths.checkpoint_dir, versions)
    # The resource check asks the cluster, so it comes last, once connected.
    cluster.connect(cfg.ray_address)
    cluster.check_resources(cfg)
    return RunPlan(cfg, urls, paths, versions)


def _manifest(cfg: Config) -> dict | None:
    try:
        return read_manifest(cfg.data.shards, cfg.data.s3_endpoint_url, cfg.data.s3_region)
    except (FileNotFoundError, ValueError):  # a glob, a single tar, or shards without a manifest
        return None


def resolve_shards(cfg: Config, echo: Callable[[str], None] = print) -> Config:
    """``cfg`` with ``data.shards: synthetic`` replaced by the demo corpus, built once under
    ``<storage_path>/_synthetic/shards``; an empty ``data.shards`` is refused."""
    if cfg.data.shards != SYNTHETIC:
        if not cfg.data.shards:
            raise ConfigError("data.shards is empty: give a folder or s3:// prefix of *.tar shards")
        return cfg
    out = ensure_synthetic_shards(f"{cfg.storage_path.rstrip('/')}/{SYNTHETIC_SHARDS}", seed=cfg.train.seed,
                                  endpoint_url=cfg.data.s3_endpoint_url, region=cfg.data.s3_region, echo=echo)
    return replace(cfg, data=replace(cfg.data, shards=out))


def refuse_incompatible_resume(cfg: Config, checkpoint_dir: str, versions: dict[str, str] | None = None) -> None:
    """Refuse a resume that would change the number of negatives (:func:`check_resume` on
    the newest checkpoint in ``checkpoint_dir``), or continue an epoch the checkpoint cannot
    account for (:func:`resume_skip` against this run's shard ``versions``), naming the
    checkpoint. The workers check both again on every restore."""
    ends = (cfg.data.s3_endpoint_url, cfg.data.s3_region)
    newest = checkpoint_folders(checkpoint_dir, *ends)
    if not newest:
        return
    folder = newest[0][1]
    try:
        state = read_state_at(folder, *ends)
    except (CheckpointError, OSError):
        return  # not readable now: the workers restore what checks out and say what they skip
    try:
        check_resume(state, cfg, cfg.train.num_workers)
        if versions is not None:
            resume_skip(state.epoch_clips, state.data_shards, versions, cfg.data.resume_epoch, folder)
    except ValueError as e:
        raise ConfigError(f"cannot resume {folder}: {e}") from None
