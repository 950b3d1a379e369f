"""What both Tune sweeps share (the probe's, :mod:`cola_ray.downstream.sweep`, and
fine-tuning's, :mod:`cola_ray.downstream.finetune_sweep`): one MLflow parent run per sweep,
one child run per trial written from the driver (:class:`TrialRuns`), the trials' table,
children a crash left running closed, and the result a person reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ray import tune

from cola_ray.downstream.probe import KIND_TAG, log_metrics, log_params

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
TRIAL_METRICS = ("train_loss", "train_accuracy", "val_accuracy", "val_loss")


class TrialRuns(tune.Callback):
    """Every trial as a child MLflow run of ``parent_run_id``, written from the driver.

    Params: the trial's config. Metrics: ``metrics`` (default :data:`TRIAL_METRICS`) at
    step = epoch (one report per epoch), one batched call per report. A trial ASHA stops is FINISHED with tag
    ``cola_ray.early_stopped=true``; a trial that raised is FAILED. ``tags`` go on every
    trial's run (the sweep's :meth:`~cola_ray.downstream.encoders.Lineage.tags`).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, run_name: str,
                 metrics: Sequence[str] = TRIAL_METRICS, tags: Mapping[str, str] | None = None) -> None:
        self.metrics = tuple(metrics)
        self.tags = dict(tags or {})
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
            tags={**self.tags, PARENT_TAG: self.parent_run_id, KIND_TAG: "trial", "cola_ray.trial_id": trial.trial_id},
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


def trial_table(grid: Any, run_ids: Mapping[str, str]) -> list[dict[str, Any]]:
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


def close_children(client: Any, exp_id: str, parent_id: str) -> None:
    """Child runs a crash left RUNNING are marked KILLED."""
    for run in client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'"
                                  " and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status="KILLED")


def describe(result: SweepResult) -> str:
    """What a person wants to read at the end of a sweep."""
    stopped = sum(t["early_stopped"] for t in result.trials)
    config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_config.items())
    return (f"{len(result.trials)} trials ({stopped} stopped early by ASHA); best on validation: {config}\n"
            f"validation accuracy {result.val_accuracy:.1%}, TEST accuracy {result.test_accuracy:.1%}\n"
            f"MLflow parent run {result.run_id}" + (f"; embeddings {result.embeddings}" if result.embeddings else ""))
