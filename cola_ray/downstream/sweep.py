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

import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from cola_ray.train import cluster, tracking
from cola_ray.downstream import embed, notes
from cola_ray.downstream import tune_runs
from cola_ray.downstream.encoders import lineage
from cola_ray.train.paths import storage_root
from cola_ray.downstream.tune_runs import SweepResult, TrialRuns, close_children, trial_table
from cola_ray.downstream.probe import (
    DEFAULT_EXPERIMENT,
    check_baseline,
    cached_embeddings,
    default_baseline,
    evaluate,
    log_evaluation,
    log_metrics,
    log_params,
    open_tracking,
    pool,
    run_tags,
    save_layer,
    split_counts,
    train_probe,
)

TRIAL_METRICS = tune_runs.TRIAL_METRICS


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


# ---- the sweep ---------------------------------------------------------------------------

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
    pooling: str = "logits",
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
    measured = lineage(encoder_ref, tracking_uri=tracking_uri).tags()
    cluster.connect(ray_address)
    path = cached_embeddings(encoder_ref, task, cache_dir=cache_dir, refresh=refresh, use_gpu=use_gpu,
                             tracking_uri=tracking_uri, ray_address=ray_address, **dict(embed_options or {}))
    emb = pool(embed.load_embeddings(path), pooling)  # probe.POOLINGS; the paper's by default
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
    parent = client.create_run(exp_id, run_name=run_name, tags=run_tags("sweep", encoder_ref, name, baseline, path, measured))
    parent_id = parent.info.run_id
    space = {
        "lr": tune.loguniform(*lr_range),
        "weight_decay": tune.choice(list(weight_decay_choices)),
        "epochs": tune.choice([int(e) for e in epoch_choices]),
        "batch_size": batch_size,
        "seed": seed,
    }
    max_epochs = max(int(e) for e in epoch_choices)
    callback = TrialRuns(uri, exp_id, parent_id, run_name, tags=measured)
    status = "FAILED"
    try:
        log_params(client, parent_id, {
            "encoder": encoder_ref, "task": task, "num_samples": num_samples, "max_concurrent": max_concurrent,
            "lr_range": list(lr_range), "weight_decay_choices": list(weight_decay_choices),
            "epoch_choices": list(epoch_choices), "batch_size": batch_size, "grace_period": grace_period,
            "reduction_factor": reduction_factor, "seed": seed, "pooling": pooling, "classes": len(classes),
            **counts,
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
            run_config=tune.RunConfig(name=run_name, storage_path=storage_root(storage_path),
                                      callbacks=[callback], verbose=verbose),
        )
        grid = tuner.fit()
        trials = trial_table(grid, callback.run_ids)
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
        close_children(client, exp_id, parent_id)
        client.set_terminated(parent_id, status=status)
        notes.note_finished(client, parent_id)
    return SweepResult(parent_id, best_config, best["run_id"], val["accuracy"], test["accuracy"],
                       test["per_class"], path, trials)
