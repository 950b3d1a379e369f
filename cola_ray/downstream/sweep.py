"""A tracked Ray Tune sweep of the linear probe: select on validation, report test once.

::

    embeddings (once, cached) --ray.put--> N trials (train_probe, tune.report every epoch)
        ASHA stops the trials behind on val_accuracy
    best trial on VALIDATION --> retrained on the driver --> TEST accuracy, reported once

The probe's hyperparameters (lr log-uniform, weight decay, epochs) are searched on the
validation split only: the trials never receive the test split. The selected config is
trained again on the driver (same seed and epochs as the trial, so the same layer) and
evaluated on test: that one number is what the parent run carries.

MLflow: one parent run for the sweep (tagged ``cola_ray.task`` / ``cola_ray.baseline``
like a probe run, so the report reads it the same way) and one child run per trial
(tag ``mlflow.parentRunId``). The child runs are written by :class:`TrialRuns`, a Tune
callback on the driver, rather than by ``MLflowLoggerCallback`` or by the trials:
the callback can nest runs under a parent only through extra tags and logs one HTTP call
per metric per epoch, and trials writing themselves would need the tracking store to be
reachable (a local sqlite file is not) from every node::

    result = sweep("runs/cola-1/checkpoint_000010000", "tasks/speech-commands", num_samples=8)
    result.best_config, result.test_accuracy
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from cola_ray.train import cluster, tracking
from cola_ray.downstream import embed
from cola_ray.config import ConfigError, read_settings
from cola_ray.downstream.probe import (
    DEFAULT_EXPERIMENT,
    KIND_TAG,
    check_baseline,
    cached_embeddings,
    default_baseline,
    evaluate,
    log_evaluation,
    log_metrics,
    log_params,
    open_tracking,
    run_tags,
    save_layer,
    split_counts,
    train_probe,
)

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
MODES = ("probe", "finetune")
TRIAL_METRICS = ("train_loss", "train_accuracy", "val_accuracy", "val_loss")


# ---- one trial --------------------------------------------------------------------------

def run_trial(config: dict[str, Any], emb: dict[str, np.ndarray]) -> None:
    """A Tune function trainable: train the probe, report every epoch (ASHA may stop it)."""
    train_probe(
        emb,
        lr=float(config["lr"]),
        weight_decay=float(config["weight_decay"]),
        epochs=int(config["epochs"]),
        batch_size=int(config["batch_size"]),
        seed=int(config["seed"]),
        on_epoch=lambda record: tune.report(dict(record)),
    )


class TrialRuns(tune.Callback):
    """Every trial as a child MLflow run of ``parent_run_id``, written from the driver.

    Params: the trial's config. Metrics: ``metrics`` (default :data:`TRIAL_METRICS`) at
    step = epoch (one report per epoch), one batched call per report. A trial ASHA stops is FINISHED with tag
    ``cola_ray.early_stopped=true``; a trial that raised is FAILED.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, run_name: str,
                 metrics: Sequence[str] = TRIAL_METRICS) -> None:
        self.metrics = tuple(metrics)
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.run_name = run_name
        self.run_ids: dict[str, str] = {}  # trial id -> child run id
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:  # Tune may pickle callbacks with its state
        return {**self.__dict__, "_client": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.run_ids:  # a restarted trial keeps its run
            return
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.run_name}-{trial.trial_id}",
            tags={PARENT_TAG: self.parent_run_id, KIND_TAG: "trial", "cola_ray.trial_id": trial.trial_id},
        )
        self.run_ids[trial.trial_id] = run.info.run_id
        log_params(self.client, run.info.run_id, trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metrics = {k: result[k] for k in self.metrics if k in result}
        log_metrics(self.client, self.run_ids[trial.trial_id], metrics, step=int(result["training_iteration"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_ids[trial.trial_id]
        done = int((trial.last_result or {}).get("training_iteration", 0))
        self.client.set_tag(run_id, "cola_ray.early_stopped", str(done < int(trial.config["epochs"])).lower())
        self.client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.client.set_terminated(self.run_ids[trial.trial_id], status="FAILED")


# ---- the sweep ---------------------------------------------------------------------------

@dataclass
class SweepResult:
    run_id: str
    """The parent MLflow run."""
    best_config: dict[str, Any]
    """``lr``, ``weight_decay``, ``epochs`` (as trained by the best trial) and ``batch_size``, ``seed``."""
    best_trial_run_id: str
    val_accuracy: float
    test_accuracy: float
    per_class: dict[str, float]
    embeddings: str
    trials: list[dict[str, Any]] = field(default_factory=list)


def sweep(
    encoder_ref: str,
    task: str,
    *,
    num_samples: int = 8,
    max_concurrent: int = 2,
    lr_range: Sequence[float] = (1e-4, 1e-1),
    weight_decay_choices: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    epoch_choices: Sequence[int] = (25, 50, 100),
    batch_size: int = 64,
    grace_period: int = 5,
    reduction_factor: float = 2,
    cpus_per_trial: float = 0.5,
    seed: int = 0,
    baseline: str = "",
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str = "",
    run_name: str = "",
    storage_path: str = "./runs/sweeps",
    cache_dir: str = "",
    refresh: bool = False,
    use_gpu: bool = False,
    embed_options: Mapping[str, Any] | None = None,
    ray_address: str = "",
    verbose: int = 1,
) -> SweepResult:
    """Search the probe's lr / weight decay / epochs on validation; report test of the best.

    ``num_samples`` random configs (lr log-uniform in ``lr_range``, the others drawn from
    their choices; ``seed`` fixes the draws and every trial's init), at most
    ``max_concurrent`` at once with ``cpus_per_trial`` CPUs each. ASHA (on epochs,
    ``grace_period``, ``reduction_factor``) stops trials behind on ``val_accuracy``.
    The best trial has the highest final ``val_accuracy`` (ties: lower ``val_loss``);
    its config, with the epochs it actually trained, is retrained on the driver and
    evaluated on test once.
    """
    baseline = check_baseline(baseline or default_baseline(encoder_ref))
    cluster.connect(ray_address)
    path = cached_embeddings(encoder_ref, task, cache_dir=cache_dir, refresh=refresh, use_gpu=use_gpu,
                             tracking_uri=tracking_uri, ray_address=ray_address, **dict(embed_options or {}))
    emb = embed.load_embeddings(path)
    counts = split_counts(emb)
    if not counts["validation_clips"]:
        raise ValueError(f"{task}: no labelled clip in the validation split; a sweep selects on validation")
    name = (embed.read_meta(path) or {}).get("task") or embed.task_name(task)
    classes = [str(c) for c in emb["classes"]]
    # The trials never see the test split.
    seen = np.asarray(emb["split"]) != "test"
    trial_emb = {k: (v if k == "classes" else np.ascontiguousarray(v[seen])) for k, v in emb.items()}

    uri, client = open_tracking(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment, uri)
    run_name = run_name or f"sweep-{name}-{baseline.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = client.create_run(exp_id, run_name=run_name, tags=run_tags("sweep", encoder_ref, name, baseline, path))
    parent_id = parent.info.run_id
    space = {
        "lr": tune.loguniform(*lr_range),
        "weight_decay": tune.choice(list(weight_decay_choices)),
        "epochs": tune.choice([int(e) for e in epoch_choices]),
        "batch_size": batch_size,
        "seed": seed,
    }
    max_epochs = max(int(e) for e in epoch_choices)
    callback = TrialRuns(uri, exp_id, parent_id, run_name)
    status = "FAILED"
    try:
        log_params(client, parent_id, {
            "encoder": encoder_ref, "task": task, "num_samples": num_samples, "max_concurrent": max_concurrent,
            "lr_range": list(lr_range), "weight_decay_choices": list(weight_decay_choices),
            "epoch_choices": list(epoch_choices), "batch_size": batch_size, "grace_period": grace_period,
            "reduction_factor": reduction_factor, "seed": seed, "classes": len(classes), **counts,
        })
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, emb=trial_emb), {"cpu": cpus_per_trial}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="val_accuracy",
                mode="max",
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_epochs,
                                        grace_period=min(grace_period, max_epochs),
                                        reduction_factor=reduction_factor),
                # The generator, not TuneConfig.max_concurrent_trials, must bound concurrency
                # when it is given as an instance (Tune ignores the latter then).
                search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed),
                num_samples=num_samples,
            ),
            run_config=tune.RunConfig(name=run_name, storage_path=os.path.abspath(storage_path),
                                      callbacks=[callback], verbose=verbose),
        )
        grid = tuner.fit()
        trials = _trial_table(grid, callback.run_ids)
        finished = [t for t in trials if t["error"] is None and t["val_accuracy"] is not None]
        if not finished:
            errors = "; ".join(str(t["error"]) for t in trials)
            raise RuntimeError(f"no trial of the sweep finished: {errors}")
        best = max(finished, key=lambda t: (t["val_accuracy"], -t["val_loss"]))
        best_config = {**{k: best["config"][k] for k in ("lr", "weight_decay", "batch_size", "seed")},
                       "epochs": best["epochs_trained"]}

        layer, _ = train_probe(emb, **best_config)
        val = evaluate(layer, emb, "validation")
        test = evaluate(layer, emb, "test")
        log_params(client, parent_id, {f"best_{k}": v for k, v in best_config.items()}
                   | {"best_epochs_budget": best["config"]["epochs"]})
        log_evaluation(client, parent_id, val, classes, "val")
        log_evaluation(client, parent_id, test, classes, "test")
        log_metrics(client, parent_id, {"trials": len(trials), "trials_early_stopped": sum(t["early_stopped"] for t in trials)})
        with tempfile.TemporaryDirectory(prefix="cola-sweep-") as tmp:
            save_layer(layer, classes, Path(tmp))
            client.log_artifacts(parent_id, tmp, "probe")
        if best["run_id"]:
            client.set_tag(parent_id, "cola_ray.best_trial_run_id", best["run_id"])
            client.set_tag(best["run_id"], "cola_ray.selected", "true")
        status = "FINISHED"
    finally:
        _close_children(client, exp_id, parent_id)
        client.set_terminated(parent_id, status=status)
    return SweepResult(parent_id, best_config, best["run_id"], val["accuracy"], test["accuracy"],
                       test["per_class"], path, trials)


def _trial_table(grid: Any, run_ids: Mapping[str, str]) -> list[dict[str, Any]]:
    """One dict per trial: config, last val_accuracy / val_loss, epochs trained, child run id."""
    out = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", "")
        done = int(metrics.get("training_iteration", 0))
        out.append({
            "trial_id": trial_id,
            "run_id": run_ids.get(trial_id, ""),
            "config": dict(result.config),
            "val_accuracy": metrics.get("val_accuracy"),
            "val_loss": metrics.get("val_loss"),
            "epochs_trained": done,
            "early_stopped": done < int(result.config["epochs"]),
            "error": result.error,
        })
    return out


def _close_children(client: Any, exp_id: str, parent_id: str) -> None:
    """Child runs a crash left RUNNING are marked KILLED."""
    for run in client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'"
                                  " and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status="KILLED")


# ---- a sweep from a YAML file (jobs/sweep.py) --------------------------------------------

def load_sweep_config(
    path: str | Path | None, overrides: Sequence[str] = (), settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`sweep`'s keyword arguments from YAML (``${VAR:-default}`` allowed), then
    ``key=value`` overrides (values read as YAML), then ``settings`` (e.g. CLI flags;
    None values are skipped).

    ``mode`` (``probe``, the default, or ``finetune``) picks the sweep; the other keys are
    the parameter names of :func:`sweep` or of
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
    return sweep


def run_sweep(settings: Mapping[str, Any]) -> SweepResult:
    """Run :func:`load_sweep_config`'s settings: the probe's sweep or fine-tuning's."""
    settings = dict(settings)
    return _sweep_function(settings.pop("mode", "probe"))(**settings)


def describe(result: SweepResult) -> str:
    """What a person wants to read at the end of a sweep."""
    stopped = sum(t["early_stopped"] for t in result.trials)
    config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_config.items())
    return (f"{len(result.trials)} trials ({stopped} stopped early by ASHA); best on validation: {config}\n"
            f"validation accuracy {result.val_accuracy:.1%}, TEST accuracy {result.test_accuracy:.1%}\n"
            f"MLflow parent run {result.run_id}" + (f"; embeddings {result.embeddings}" if result.embeddings else ""))
