"""MLflow: the driver opens (or re-opens) the run; world rank 0 logs into it.

The driver creates the run before training starts, so it can print where the run is
and so a resumed job (same run name) continues the same MLflow run. Workers never use
MLflow's fluent global state for metrics: rank 0 holds a :class:`RunLogger` bound to the
run id. Nothing secret is logged: params are the config, which holds no credentials, and
any URL in it has the password of its user-info part masked (:func:`redact`).
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from cola_ray.config import Config

RUN_NAME_TAG = "cola_ray.run_name"

# An MLflow client retries for minutes while its server is down; a training step must
# not wait that long. Bounded here, before mlflow is imported anywhere in this process.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends, with any
# user:password in the URI; fit() prints its own, redacted, link instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


PROBE_TIMEOUT_S = 10.0
"""How long the driver waits for an MLflow server to answer before training starts."""

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<secret>[^/@\s]*)@")


def redact(value: Any) -> Any:
    """``http://user:pass@host`` -> ``http://user:***@host`` in any string; other values as given.

    Params, tags and printed URLs pass through here: a config value (a tracking URI, an
    S3 endpoint) may carry credentials in its user-info part.
    """
    if not isinstance(value, str):
        return value
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)


def redact_tree(tree: Any) -> Any:
    """:func:`redact` every string of a nested dict / list (a config crossing into Ray, a checkpoint)."""
    if isinstance(tree, Mapping):
        return {k: redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_tree(v) for v in tree]
    return redact(tree)


def check_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds, naming the (redacted) URI, if an http(s) tracking
    server does not answer. Any HTTP status counts as an answer (auth is the client's
    business); other stores (sqlite, file, databricks) are not probed.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    # Credentials in the URI's user-info are not sent with the probe, and never printed.
    try:
        urllib.request.urlopen(_URL_USERINFO.sub(lambda m: m["scheme"], url), timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"MLflow tracking server {redact(uri)} (tracking.tracking_uri / MLFLOW_TRACKING_URI) "
            f"did not answer within {timeout:.0f}s: {reason}"
        ) from None


def resolve_tracking_uri(uri: str = "") -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else a sqlite store ``./mlflow.db``.

    Relative sqlite paths are made absolute here, on the driver, because Ray workers
    run in other working directories.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, keep artifacts beside the database (absolute path)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing (local stores keep artifacts beside the db)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_root(uri))


def start_or_resume_run(cfg: Config, run_name: str, tags: Mapping[str, str] = ()) -> tuple[str, str, bool]:
    """Return ``(tracking_uri, run_id, resumed)`` for the run called ``run_name``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, uri)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "cola_ray.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        return uri, run_id, True
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **dict(tags)})
    params = [mlflow.entities.Param(k, str(redact(v))[:6000]) for k, v in cfg.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return uri, run.info.run_id, False


def end_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def run_url(uri: str, run_id: str, experiment: str) -> str:
    """A human pointer to the run: the UI URL for a server, else how to open the UI."""
    uri = redact(uri)
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/?searchFilter=attributes.run_id%3D%27{run_id}%27"
    return f"mlflow ui --backend-store-uri {uri}   (experiment {experiment!r}, run {run_id})"


class RunLogger:
    """Rank 0's handle on the run: metrics by step, artifacts, the final encoder."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_encoder(self, encoder: Any, example_input: Any, registered_model_name: str = "") -> str:
        """Log the encoder (waveform -> embedding) as an MLflow PyTorch model; return its URI."""
        import mlflow
        import mlflow.pytorch
        import torch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        mlflow.set_tracking_uri(self.uri)
        encoder = encoder.eval().cpu()
        with torch.no_grad():
            out = encoder(torch.as_tensor(example_input)).numpy()
        # Both axes free: any batch of waveforms of any length (at least one window).
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, out.shape[1]))]))
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                encoder,
                name="encoder",
                signature=signature,
                input_example=example_input,
                registered_model_name=registered_model_name or None,
            )
        # start_run's context ends the run; the driver sets the final status.
        self.client.update_run(self.run_id, status="RUNNING")
        return info.model_uri
