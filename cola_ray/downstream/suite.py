"""The whole downstream evaluation: every task x every baseline, then the paper's table.

::

    tasks (prepared shards | a dataset to prepare | "synthetic")
      x columns  log-mel          probe sweep   of logmel (log-mel mean + std, nothing learned)
                 random init      probe sweep   of random:<the encoder's architecture>
                 COLA frozen      probe sweep   of the encoder
                 supervised       fine-tune sweep from scratch (the encoder's architecture)
                 COLA fine-tuned  fine-tune sweep of the encoder
    --> one MLflow experiment --> cola_ray.downstream.report: report.md / report.csv / report.png

One driver runs the cells one after another; each cell is itself parallel (Tune trials,
Ray Train workers, Ray Data). A cell that fails is recorded and the suite goes on with
the next, so that a day-long run on a cluster is not lost to one bad task; the report is
written from what finished, and the suite then fails naming every failed cell. A cell
whose (task, baseline) already has a finished run in the experiment is skipped unless
``rerun`` is set, so a resubmitted suite picks up where it stopped.

``jobs/downstream.py`` runs it with ``ray job submit``; ``jobs/configs/downstream.yaml``
documents every key::

    result = run_suite("runs/cola-1/checkpoint_000100000",
                       [{"shards": "s3://b/tasks/spc1"}, {"prepare": "musan", "src": "/data/musan",
                                                          "shards": "s3://b/tasks/musan"}])
"""

from __future__ import annotations

import inspect
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cola_ray.data import storage
from cola_ray.data.synthetic import SYNTHETIC
from cola_ray.config import ConfigError, read_settings
from cola_ray.downstream.probe import BASELINES, DEFAULT_EXPERIMENT
from cola_ray.downstream.tags import BASELINE_TAG, ENCODER_TAG, TASK_TAG
from cola_ray.model.encoder import LOGMEL

PROBE_COLUMNS = ("log-mel", "random init", "COLA frozen")
FINETUNE_COLUMNS = ("supervised", "COLA fine-tuned")


@dataclass
class SuiteResult:
    cells: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(task, baseline) -> the sweep's :class:`~cola_ray.downstream.tune_runs.SweepResult`."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Cells that already had a finished run in the experiment."""
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    """(task, baseline) -> the error, for cells that raised."""
    report: Any = None
    """The :class:`~cola_ray.downstream.report.Report` of the experiment after the suite."""


def run_suite(
    encoder_ref: str,
    tasks: Sequence[Mapping[str, Any] | str],
    *,
    columns: Sequence[str] = BASELINES,
    random_encoder: str = "",
    probe: Mapping[str, Any] | None = None,
    finetune: Mapping[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str = "",
    storage_path: str = "./runs/downstream",
    report_dir: str = "./report",
    rerun: bool = False,
    endpoint_url: str = "",
    region: str = "",
    ray_address: str = "",
    echo: Callable[[str], None] = print,
) -> SuiteResult:
    """Run every column of ``columns`` on every task, then :func:`cola_ray.downstream.report.report`.

    ``tasks``: each a mapping with ``shards`` (prepared task shards, folder or s3://), and
    optionally ``prepare`` (an adapter of :mod:`cola_ray.data.tasks`) + ``src`` (the dataset in
    its native layout) to prepare them first when ``shards`` holds no task.json; or the
    string ``synthetic`` for a small generated task (smoke runs). ``probe`` and
    ``finetune`` are keyword arguments of :func:`cola_ray.downstream.sweep.sweep` and
    :func:`cola_ray.downstream.finetune_sweep.finetune_sweep` for every cell of their columns.
    ``random_encoder`` (default ``random:<the encoder's timm model>``) is the random-init
    baseline. Raises RuntimeError naming the failed cells, after the report is written.
    """
    from cola_ray.train import cluster
    from cola_ray.downstream import report as report_mod
    from cola_ray.downstream.encoders import resolve_encoder
    from cola_ray.downstream.finetune_sweep import finetune_sweep
    from cola_ray.downstream.sweep import sweep

    columns = _check_columns(columns)
    probe, finetune = dict(probe or {}), dict(finetune or {})
    for name, options, fn in (("probe", probe, sweep), ("finetune", finetune, finetune_sweep)):
        _check_keys(name, options, fn)
    if not tasks:
        raise ConfigError("the suite has no task: give tasks as a list of {shards: ...} or 'synthetic'")
    _, info = resolve_encoder(encoder_ref, tracking_uri=tracking_uri)  # fails here, naming it, if unresolvable
    random_encoder = random_encoder or f"random:{info['encoder']}"
    prepared = [_prepare(t, storage_path, endpoint_url, region, echo) for t in tasks]

    common = {"experiment": experiment, "tracking_uri": tracking_uri, "ray_address": ray_address}
    io = {"endpoint_url": endpoint_url, "region": region}
    if endpoint_url or region:  # the probe reads the task's shards through its embedding step
        probe["embed_options"] = {**io, **dict(probe.get("embed_options") or {})}
    refs = {"log-mel": LOGMEL, "random init": random_encoder, "COLA frozen": encoder_ref,
            "COLA fine-tuned": encoder_ref, "supervised": encoder_ref}
    done = _finished_cells(experiment, tracking_uri, refs) if not rerun else set()
    result = SuiteResult()
    for task_name, shards_url in prepared:
        for column in columns:
            cell = (task_name, column)
            if cell in done:
                echo(f"[suite] {task_name} / {column}: already in {experiment!r}, skipped (rerun=true redoes it)")
                result.skipped.append(cell)
                continue
            echo(f"[suite] {task_name} / {column}")
            started = time.monotonic()
            try:
                cluster.connect(ray_address)  # here, not before: a resumed suite may have nothing left to run
                if column == "log-mel":  # the hand-made features: nothing learned, the same probe sweep
                    out = sweep(LOGMEL, shards_url, baseline=column, storage_path=f"{storage_path}/sweeps",
                                **common, **probe)
                elif column == "random init":
                    out = sweep(random_encoder, shards_url, baseline=column,
                                storage_path=f"{storage_path}/sweeps", **common, **probe)
                elif column == "COLA frozen":
                    out = sweep(encoder_ref, shards_url, baseline=column, storage_path=f"{storage_path}/sweeps",
                                **common, **probe)
                else:
                    out = finetune_sweep(encoder_ref, shards_url, from_scratch=column == "supervised",
                                         baseline=column, storage_path=f"{storage_path}/finetune", **common,
                                         **io, **finetune)
            except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
                result.failed[cell] = f"{type(e).__name__}: {e}"
                echo(f"[suite] {task_name} / {column} FAILED: {e}\n{traceback.format_exc(limit=5)}")
                continue
            result.cells[cell] = out
            echo(f"[suite] {task_name} / {column}: test accuracy {out.test_accuracy:.1%} "
                 f"({time.monotonic() - started:.0f}s)")
    if result.cells or result.skipped:
        result.report = report_mod.report(experiment, report_dir, tracking_uri=tracking_uri)
        echo(result.report.markdown)
    if result.failed:
        raise RuntimeError(f"{len(result.failed)} cell(s) of the suite failed: "
                           + "; ".join(f"{t} / {c}: {e}" for (t, c), e in result.failed.items()))
    return result


def _check_columns(columns: Sequence[str]) -> list[str]:
    columns = [str(c) for c in columns]
    unknown = [c for c in columns if c not in BASELINES]
    if unknown or not columns:
        raise ConfigError(f"suite columns must be among {', '.join(BASELINES)}; got {columns}")
    return columns


def _check_keys(section: str, options: Mapping[str, Any], fn: Callable) -> None:
    """The section's keys must be ``fn``'s, less those the suite sets per cell."""
    set_here = {"encoder_ref", "task", "baseline", "from_scratch", "experiment", "tracking_uri", "storage_path",
                "run_name", "ray_address", "endpoint_url", "region"}
    known = set(inspect.signature(fn).parameters) - set_here
    for key in options:
        if key not in known:
            raise ConfigError(f"unknown suite key '{section}.{key}'; known keys: {', '.join(sorted(known))}")


def _prepare(task: Mapping[str, Any] | str, storage_path: str, endpoint_url: str, region: str,
             echo: Callable[[str], None]) -> tuple[str, str]:
    """``(task name, shards url)``, preparing the shards first where asked."""
    from cola_ray.downstream import embed
    from cola_ray.data import tasks as tasks_mod

    if task == SYNTHETIC or (isinstance(task, Mapping) and task.get("shards") == SYNTHETIC):
        out = f"{storage_path.rstrip('/')}/_synthetic/task"
        if not storage.is_s3(out):
            out = str(Path(out).resolve())
        echo(f"[suite] synthetic task at {out}")
        tasks_mod.synthetic_task(out, endpoint_url=endpoint_url, region=region)
        return "synthetic", out
    if not isinstance(task, Mapping) or not task.get("shards"):
        raise ConfigError(f"a suite task needs 'shards' (or is 'synthetic'); got {task!r}")
    unknown = set(task) - {"shards", "prepare", "src", "seed"}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in suite task {task!r}")
    shards_url = str(task["shards"])
    meta = embed.read_task(shards_url, endpoint_url, region)
    if not meta and task.get("prepare"):
        if not task.get("src"):
            raise ConfigError(f"suite task {shards_url!r}: 'prepare: {task['prepare']}' needs 'src'")
        echo(f"[suite] preparing {task['prepare']} from {task['src']} into {shards_url}")
        meta = tasks_mod.prepare_task(str(task["prepare"]), task["src"], shards_url, seed=int(task.get("seed", 0)),
                                      progress=False, endpoint_url=endpoint_url, region=region)
    return str(meta.get("task") or embed.task_name(shards_url)), shards_url


def _finished_cells(experiment: str, tracking_uri: str, refs: dict[str, str]) -> set[tuple[str, str]]:
    """(task, baseline) of the finished runs with a test accuracy already in the experiment
    that measured this suite's encoder for that column (``refs``: baseline -> encoder
    reference, the run's ``cola_ray.model.encoder`` tag): a suite of another encoder in the
    same experiment does not count as done. Runs that name no encoder count for log-mel only."""
    from cola_ray.downstream.probe import open_tracking
    from cola_ray.downstream.report import measured_runs

    _, client = open_tracking(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    done = set()
    for run in measured_runs(client, exp.experiment_id):
        tags = run.data.tags
        baseline, ref = tags[BASELINE_TAG], tags.get(ENCODER_TAG)
        if ref == refs.get(baseline) or (ref is None and baseline == "log-mel"):
            done.add((tags[TASK_TAG], baseline))
    return done


# ---- a suite from a YAML file (jobs/downstream.py) ------------------------------------------

def load_suite_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """:func:`run_suite`'s keyword arguments from YAML (``${VAR:-default}`` allowed) and
    ``key=value`` / ``probe.key=value`` overrides. Unknown keys fail naming them."""
    data = read_settings(path, overrides)
    known = set(inspect.signature(run_suite).parameters) - {"echo"}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown suite key {key!r}; known keys: {', '.join(sorted(known))}")
    if not data.get("encoder_ref"):
        raise ConfigError("suite key 'encoder_ref' is required (the COLA encoder to evaluate)")
    data["encoder_ref"] = str(data["encoder_ref"])
    from cola_ray.downstream.finetune_sweep import finetune_sweep
    from cola_ray.downstream.sweep import sweep

    for section, fn in (("probe", sweep), ("finetune", finetune_sweep)):
        if data.get(section) in (None, ""):
            data.pop(section, None)
        elif not isinstance(data[section], Mapping):
            raise ConfigError(f"suite key {section!r} must be a mapping of settings")
        else:
            _check_keys(section, data[section], fn)
    if "columns" in data:
        data["columns"] = _check_columns(data["columns"] if isinstance(data["columns"], list) else [data["columns"]])
    if isinstance(data.get("tasks"), (str, Mapping)):
        data["tasks"] = [data["tasks"]]
    return data
