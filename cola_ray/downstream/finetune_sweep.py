"""A tracked Ray Tune sweep of fine-tuning: select on validation, report test once.

The fine-tuning counterpart of :mod:`cola_ray.downstream.sweep` (the probe's sweep)::

    N trials (a Tune function each)
        trial --> TorchTrainer "<sweep>-<trial id>" (Ray Train workers, Ray Data crops)
              --> TuneReportCallback: one Tune result per epoch (epoch_val_accuracy ...)
        ASHA stops the trials behind on epoch_val_accuracy (the trial, and with it its trainer)
    best trial on VALIDATION --> fine-tuned again with its config (cola_ray.downstream.finetune.finetune)
        --> TEST accuracy, reported once, on the parent run

Ray 2.60 no longer takes a TorchTrainer as a Tune trainable: each trial is a function
that builds and fits its own TorchTrainer, whose :class:`TuneReportCallback` forwards
rank 0's per-epoch reports to Tune. The trials never evaluate test (``test=False`` in
their settings); the selected configuration is trained once more as a child run of the
parent (so it also carries the per-epoch curves, the selected weights and the confusion
matrices) and its test accuracy is the sweep's.

A trial's score is its best ``epoch_val_accuracy`` (``select="best"``: the weights the
retrained run keeps) or its last (``select="last"``); the best trial's epochs are those
it actually trained (ASHA may have stopped it early). Resources: a trial holds
``cpus_per_trial`` while its trainer's ``num_workers`` workers hold ``cpus_per_worker`` each
and its decode tasks ``decode_num_cpus``: on a small machine keep ``max_concurrent`` low
or the workers of the running trials starve each other::

    result = finetune_sweep("runs/cola-1/checkpoint_000010000", "tasks/spc1", num_samples=8,
                            num_workers=4, use_gpu=True, max_concurrent=2)
    result.best_config, result.test_accuracy
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from cola_ray.train import cluster, tracking
from cola_ray.train.paths import storage_root
from cola_ray.downstream import finetune, notes
from cola_ray.downstream.probe import (BASELINE_TAG, DEFAULT_EXPERIMENT, ENCODER_TAG, KIND_TAG, TASK_TAG, log_metrics,
                            log_params, open_tracking)
from cola_ray.downstream.tune_runs import PARENT_TAG, SweepResult, TrialRuns, close_children

METRIC = "epoch_val_accuracy"
TRIAL_METRICS = ("train_loss", "train_accuracy", "epoch_val_accuracy", "epoch_val_loss")


def run_trial(config: dict[str, Any], job: finetune.FinetuneJob, trainer: dict[str, Any]) -> None:
    """A Tune function trainable: one TorchTrainer, named after the trial, reporting every epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = job.with_settings(lr=float(config["lr"]), weight_decay=float(config["weight_decay"]),
                              epochs=int(config["epochs"]), test=False, log_model=False)
    name = f"{trainer['name']}-{tune.get_context().get_trial_id()}"
    finetune.make_trainer(trial, {"tracking_uri": trainer["tracking_uri"], "mlflow_run_id": ""}, name=name,
                          storage_path=trainer["storage_path"], num_workers=trainer["num_workers"],
                          use_gpu=trainer["use_gpu"], decode_num_cpus=trainer["decode_num_cpus"],
                          callbacks=[TuneReportCallback()]).fit()


def finetune_sweep(
    encoder_ref: str,
    task: str,
    *,
    from_scratch: bool = False,
    num_samples: int = 4,
    max_concurrent: int = 1,
    lr_range: Sequence[float] = (1e-5, 1e-3),
    weight_decay_choices: Sequence[float] = (0.0, 1e-4, 1e-3),
    epoch_choices: Sequence[int] = (10, 20, 30),
    batch_size: int = 64,
    grace_period: int = 2,
    reduction_factor: float = 2,
    seed: int = 0,
    select: str = "best",
    baseline: str = "",
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    decode_num_cpus: float = 0.5,
    cpus_per_trial: float = 0.1,
    segment_samples: int = 15600,
    remainder: str = "end",
    sample_rate: int = 16000,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str = "",
    run_name: str = "",
    storage_path: str = "./runs/sweeps",
    log_model: bool = True,
    endpoint_url: str = "",
    region: str = "",
    ray_address: str = "",
    verbose: int = 1,
) -> SweepResult:
    """Search fine-tuning's lr / weight decay / epochs on validation; report test of the best.

    ``num_samples`` random configs (lr log-uniform in ``lr_range``, the others from their
    choices; ``seed`` fixes the draws and every trial's init), at most ``max_concurrent``
    at once. ASHA (on epochs: ``grace_period``, ``reduction_factor``) stops trials behind
    on ``epoch_val_accuracy``. ``from_scratch=True`` sweeps the supervised baseline.
    Bad input (task, encoder, select) fails before any trial starts, naming it.
    """
    job = finetune.plan(encoder_ref, task, from_scratch=from_scratch, batch_size=batch_size, seed=seed,
                        select=select, baseline=baseline, cpus_per_worker=cpus_per_worker,
                        segment_samples=segment_samples, remainder=remainder, sample_rate=sample_rate,
                        log_model=log_model, endpoint_url=endpoint_url, region=region, tracking_uri=tracking_uri)
    cluster.connect(ray_address)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    uri, client = open_tracking(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment, uri)
    run_name = run_name or (f"sweep-finetune-{job.task_name}-{job.baseline.replace(' ', '-')}-"
                            f"{time.strftime('%Y%m%d-%H%M%S')}")
    measured = job.lineage_tags(uri)
    parent = client.create_run(exp_id, run_name=run_name, tags={
        KIND_TAG: "sweep", ENCODER_TAG: encoder_ref, TASK_TAG: job.task_name, BASELINE_TAG: job.baseline,
        "cola_ray.downstream.sweep": "finetune", "cola_ray.from_scratch": str(from_scratch).lower(), **measured})
    parent_id = parent.info.run_id
    max_epochs = max(int(e) for e in epoch_choices)
    space = {"lr": tune.loguniform(*lr_range), "weight_decay": tune.choice(list(weight_decay_choices)),
             "epochs": tune.choice([int(e) for e in epoch_choices]), "batch_size": batch_size, "seed": seed}
    callback = TrialRuns(uri, exp_id, parent_id, run_name, metrics=TRIAL_METRICS, tags=measured)
    root = storage_root(storage_path)
    trainer = {"name": run_name, "tracking_uri": uri, "storage_path": root, "num_workers": num_workers,
               "use_gpu": use_gpu, "decode_num_cpus": decode_num_cpus}
    status = "FAILED"
    try:
        log_params(client, parent_id, {
            "encoder": encoder_ref, "task": task, "from_scratch": from_scratch, "num_samples": num_samples,
            "max_concurrent": max_concurrent, "lr_range": list(lr_range),
            "weight_decay_choices": list(weight_decay_choices), "epoch_choices": list(epoch_choices),
            "batch_size": batch_size, "grace_period": grace_period, "reduction_factor": reduction_factor,
            "seed": seed, "select": select, "num_workers": num_workers, "classes": len(job.data["classes"]),
        })
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, job=job, trainer=trainer), {"cpu": cpus_per_trial}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max",
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_epochs,
                                        grace_period=min(grace_period, max_epochs),
                                        reduction_factor=reduction_factor),
                search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed),
                num_samples=num_samples,
            ),
            run_config=tune.RunConfig(name=run_name, storage_path=root, callbacks=[callback], verbose=verbose),
        )
        trials = trial_table(tuner.fit(), callback.run_ids, select)
        finished = [t for t in trials if t["error"] is None and t["val_accuracy"] is not None]
        if not finished:
            raise RuntimeError("no trial of the fine-tuning sweep finished: "
                               + "; ".join(str(t["error"]) for t in trials))
        best = max(finished, key=lambda t: (t["val_accuracy"], -t["val_loss"]))
        best_config = {"lr": best["config"]["lr"], "weight_decay": best["config"]["weight_decay"],
                       "epochs": best["epochs_trained"], "batch_size": batch_size, "seed": seed}
        log_params(client, parent_id, {f"best_{k}": v for k, v in best_config.items()}
                   | {"best_epochs_budget": best["config"]["epochs"]})
        if best["run_id"]:
            client.set_tag(parent_id, "cola_ray.best_trial_run_id", best["run_id"])
            client.set_tag(best["run_id"], "cola_ray.selected", "true")
        # The selected config, trained once more with test evaluation: a child run of its own.
        final = finetune.finetune(
            encoder_ref, task, from_scratch=from_scratch, **best_config, select=select, baseline=job.baseline,
            num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
            decode_num_cpus=decode_num_cpus, segment_samples=segment_samples, remainder=remainder,
            sample_rate=sample_rate, experiment=experiment, tracking_uri=uri, run_name=f"{run_name}-selected",
            storage_path=root, log_model=log_model, endpoint_url=endpoint_url, region=region,
            tags={PARENT_TAG: parent_id})
        client.set_tag(parent_id, "cola_ray.selected_run_id", final.run_id)
        log_metrics(client, parent_id, {
            "val_accuracy": final.val_accuracy, "test_accuracy": final.test_accuracy,
            "selected_epoch": final.selected_epoch, "trials": len(trials),
            "trials_early_stopped": sum(t["early_stopped"] for t in trials)})
        status = "FINISHED"
    finally:
        close_children(client, exp_id, parent_id)
        client.set_terminated(parent_id, status=status)
        notes.note_finished(client, parent_id)
    return SweepResult(parent_id, best_config, best["run_id"], final.val_accuracy, final.test_accuracy,
                       final.per_class, "", trials)


def trial_table(grid: Any, run_ids: dict[str, str], select: str) -> list[dict[str, Any]]:
    """One dict per trial: config, its score on validation (best or last epoch), epochs trained."""
    out = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        val = val_loss = None
        if history is not None and METRIC in history and len(history):
            history = history.dropna(subset=[METRIC])
            row = history.loc[history[METRIC].idxmax()] if select == "best" else history.iloc[-1]
            val, val_loss = float(row[METRIC]), float(row.get("epoch_val_loss", math.nan))
            if math.isnan(val_loss):
                val_loss = math.inf
        done = int(metrics.get("training_iteration", 0))
        out.append({
            "trial_id": metrics.get("trial_id", ""),
            "run_id": run_ids.get(metrics.get("trial_id", ""), ""),
            "config": dict(result.config),
            "val_accuracy": val,
            "val_loss": val_loss,
            "epochs_trained": done,
            "early_stopped": done < int(result.config["epochs"]),
            "error": result.error,
        })
    return out
