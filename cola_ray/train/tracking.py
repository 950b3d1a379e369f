"""MLflow: the driver opens (or re-opens) the run; world rank 0 logs into it.

The driver creates the run before training starts, so it can print where the run is
and so a resumed job (same run name) continues the same MLflow run. Workers never use
MLflow's fluent global state for metrics: rank 0 holds a :class:`SpooledLogger` bound to
the run id, which never blocks a step (see there). System metrics (CPU, memory, network,
GPUs) come from MLflow's monitor on local rank 0 of each node (:func:`start_system_metrics`).
Nothing secret is logged: params are the config, which holds no credentials, and
any URL in it has the password of its user-info part masked (:func:`redact`).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
import warnings
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
    """A direct handle on the run: metrics by step, artifacts, the final encoder. Each call
    waits for the server (bounded retries); training logs through :class:`SpooledLogger`."""

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
        with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():
            # MLflow reloads the exported program from a read-only buffer to check it; torch
            # warns about that buffer's writability, which that check never relies on.
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            info = mlflow.pytorch.log_model(
                encoder,
                name="encoder",
                signature=signature,
                input_example=example_input,
                registered_model_name=registered_model_name or None,
                # Stated, not inferred: MLflow's inference loads the model again in a subprocess
                # (~6 s of every run's end on 2 cores) to list what it imports.
                pip_requirements=encoder_requirements(),
            )
        # start_run's context ends the run; the driver sets the final status.
        self.client.update_run(self.run_id, status="RUNNING")
        return info.model_uri


ENCODER_REQUIREMENTS = ("torch", "numpy", "pandas", "cloudpickle")
"""What loading the logged encoder imports (an exported program: no timm, no cola_ray), as
MLflow's own inference listed it (it adds ``mlflow`` itself)."""


def encoder_requirements() -> list[str]:
    """``ENCODER_REQUIREMENTS`` pinned to this environment's versions, local labels dropped
    (``torch==2.11.0``, not ``2.11.0+cpu``: the wheel index decides the build)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ENCODER_REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


# ---- system metrics: one monitor per node, on its local rank 0 ---------------------------

SYSTEM_METRICS_NODE_TAG = "cola_ray.system_metrics.node_{}"
"""Tag naming the host behind ``system/node_<rank>/...`` (node ranks are Ray Train's, per start)."""


def start_system_metrics(tracking_uri: str, run_id: str, cfg: Config, *, node_rank: int | None = None,
                         local_rank: int = 0) -> Any:
    """Start MLflow's system-metrics monitor for this node in the run; return it, or ``None``.

    With ``tracking.system_metrics`` on and ``local_rank`` 0 (one monitor per node), a
    background thread samples CPU, memory, disk and network (psutil) and, where
    ``nvidia-ml-py`` is installed (``cola-ray[gpu]``) and NVML finds GPUs, every GPU of the
    node (utilisation, memory, power), every ``tracking.system_metrics_interval_s``, into
    ``system/node_<node_rank>/<name>`` (``system/<name>`` when ``node_rank`` is None), e.g.
    ``system/node_0/cpu_utilization_percentage``. Its steps are sample counts, continued
    across restarts of the run. The monitor stops itself when the run is no longer RUNNING
    or MLflow fails to answer; a monitor that cannot start is a warning, never a failed run.
    Stop it with :func:`stop_system_metrics`.
    """
    import importlib.util
    import logging

    log = logging.getLogger(__name__)
    if not cfg.tracking.system_metrics or local_rank != 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:  # psutil missing: a dependency of cola-ray, but not of MLflow
        log.warning("MLflow system metrics are off: %s (pip install psutil)", e)
        return None
    if cfg.train.use_gpu and importlib.util.find_spec("pynvml") is None:  # nvidia-ml-py: MLflow's GPU monitor
        log.warning("MLflow system metrics: no GPU metrics without nvidia-ml-py (pip install 'cola-ray[gpu]')")
    node_id = None if node_rank is None else f"node_{node_rank}"
    from cola_ray.console import verbose_requested

    if not verbose_requested():  # its start / stop INFO lines on every node's console
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_interval_s,
                                       resume_logging=True, node_id=node_id, tracking_uri=tracking_uri)
        if node_id is not None:
            import socket

            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).set_tag(run_id, SYSTEM_METRICS_NODE_TAG.format(node_rank), socket.gethostname())
        monitor.start()
    except Exception as e:  # the server went away since the driver created the run
        log.warning("MLflow system metrics are off for this node: %s", _short(e))
        return None
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Deliver what ``monitor`` has recorded and stop its thread (``None``: nothing to do)."""
    if monitor is not None:
        monitor.finish()  # logs its own errors; never raises


# ---- rank 0's logger during training: never blocks a step -------------------------------

SPOOL_SUFFIX = ".jsonl"


class SpooledLogger:
    """Rank 0's metrics, tags and checkpoint copies, delivered by a background thread.

    A step only appends one JSON line to a local spool file (``spool_dir/<run_id>.jsonl``,
    a write-ahead log) and returns; the thread delivers the records in order and empties
    the file once everything in it is in MLflow. While the server does not answer, records
    wait in the spool and the thread retries every ``retry_s`` (probing ``/health`` first,
    so a dead server costs no client retries), so an outage never blocks a step and a
    killed process loses nothing already logged: the next rank 0 on this node (a restarted
    worker group) delivers what the old one left.

    Exactly once: before delivering a metric key for the first time after a start or an
    outage, the thread reads the highest step the run already has for it and drops
    records at or below it. That covers a batch the client gave up on after the server had
    stored it, a spool replayed twice, and the steps a restarted group re-trains after its
    checkpoint (their first values stay; the metric history keeps one point per step).
    """

    def __init__(self, tracking_uri: str, run_id: str, spool_dir: str | os.PathLike, *,
                 retry_s: float = 2.0, log: Any = None) -> None:
        import collections
        import logging
        import threading

        self.uri, self.run_id = tracking_uri, run_id
        self.retry_s = retry_s
        self.log = log or logging.getLogger(__name__)
        self.client = RunLogger(tracking_uri, run_id)
        Path(spool_dir).mkdir(parents=True, exist_ok=True)
        self.spool = Path(spool_dir) / f"{run_id}{SPOOL_SUFFIX}"
        self.staging = Path(spool_dir) / "staged"
        self._lock = threading.Condition()
        self._pending: collections.deque[dict[str, Any]] = collections.deque(read_spool(self.spool))
        if self._pending:  # left by a previous process (killed, or its server was down)
            self.log.warning("delivering %d MLflow records left in %s", len(self._pending), self.spool)
        self._file = open(self.spool, "a", encoding="utf-8")
        self._stop = self._closed = False
        self.delivered = self.dropped = self.outages = 0
        self.outage = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="cola-ray-mlflow")
        self._thread.start()

    # ---- called by the training loop: append and return ------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._append({"run_id": self.run_id, "step": int(step), "timestamp": int(time.time() * 1000),
                      "metrics": {k: float(v) for k, v in metrics.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._append({"run_id": self.run_id, "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Copy ``local_dir`` aside (the caller may delete it) and upload it in the background."""
        import shutil

        staged = self.staging / artifact_path.replace("/", "__")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(local_dir, staged)
        self._append({"run_id": self.run_id, "artifacts": str(staged), "artifact_path": artifact_path})

    def close(self, timeout: float) -> int:
        """Deliver what is left within ``timeout`` seconds; return how many records stay in the
        spool (0: all in MLflow, spool file removed)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout)
        with self._lock:
            left = len(self._pending)
            self._closed = True  # the thread, if still trying, stops at its next step
            self._file.close()
            if not left:
                self.spool.unlink(missing_ok=True)
        self.log.info("MLflow: %d metric points delivered, %d already in the run, %d outage(s), %d left",
                      self.delivered, self.dropped, self.outages, left)
        return left

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            self._pending.append(record)
            self._lock.notify_all()

    # ---- the delivery thread --------------------------------------------------------
    def _run(self) -> None:
        known: dict[str, int] = {}  # metric key -> highest step the run has (read after each start/outage)
        while True:
            with self._lock:
                while not self._pending and not self._stop:
                    self._lock.wait()
                if not self._pending or self._closed:
                    return
                batch = list(self._pending)[:200]
            try:
                if self.outage:
                    check_server(self.uri, timeout=2.0)
                sent, dropped = deliver(self.client, batch, known)
            except Exception as e:  # server down, timeout, 5xx: keep the records, retry
                if _refused(e):  # the server answered "never": retrying would block every later record
                    self.log.error("MLflow refused %d record(s), dropping them: %s", len(batch), _short(e))
                    with self._lock:
                        for _ in batch:
                            self._pending.popleft()
                    continue
                if not self.outage:
                    self.outages += 1
                    self.log.warning("MLflow %s unreachable (%s); metrics wait in %s and are retried every %.0fs",
                                     redact(self.uri), _short(e), self.spool, self.retry_s)
                self.outage = True
                known.clear()  # a timed-out call may have been stored: re-read before sending again
                with self._lock:
                    if self._closed:
                        return
                    self._lock.wait(self.retry_s)
                continue
            if self.outage:
                self.log.warning("MLflow %s answers again; delivering the spooled records", redact(self.uri))
            self.outage = False
            with self._lock:
                if self._closed:
                    return
                for _ in batch:
                    self._pending.popleft()
                self.delivered += sent
                self.dropped += dropped
                if not self._pending:  # all in MLflow: empty the write-ahead log
                    self._file.truncate(0)
                    self._file.seek(0)


def read_spool(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a spool file, in order (a line cut short by a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def deliver(client: "RunLogger", records: list[dict[str, Any]], known: dict[str, int]) -> tuple[int, int]:
    """Send ``records`` in order; metric points at or below the run's highest step for their
    key are dropped (``known`` caches it per key). Returns ``(metric points sent, dropped)``."""
    import shutil

    from mlflow.entities import Metric

    sent = dropped = 0
    batch: list[Metric] = []

    def send() -> None:
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            client.client.log_batch(client.run_id, metrics=batch[i : i + 1000])
        batch.clear()

    for rec in records:
        if "metrics" in rec:
            for key, value in rec["metrics"].items():
                if key not in known:
                    history = client.client.get_metric_history(client.run_id, key)
                    known[key] = max((m.step for m in history), default=-1)
                if rec["step"] <= known[key]:
                    dropped += 1
                    continue
                batch.append(Metric(key, value, rec["timestamp"], rec["step"]))
                known[key] = rec["step"]
                sent += 1
        elif "tags" in rec:
            send()
            client.set_tags(rec["tags"])
        elif "artifacts" in rec:
            send()
            if os.path.isdir(rec["artifacts"]):
                client.log_artifacts(rec["artifacts"], rec["artifact_path"])
                shutil.rmtree(rec["artifacts"], ignore_errors=True)
    send()
    return sent, dropped


def replay_spool(path: str | os.PathLike, tracking_uri: str = "") -> tuple[int, int]:
    """Deliver a spool file left by a run whose MLflow server was down at its end
    (``cola-ray replay-metrics``); steps already in the run are not logged again. Returns
    ``(metric points sent, dropped as already there)``; the file is removed once delivered."""
    records = read_spool(path)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_run.setdefault(rec["run_id"], []).append(rec)
    uri = resolve_tracking_uri(tracking_uri)
    check_server(uri)
    sent = dropped = 0
    for run_id, recs in by_run.items():
        s, d = deliver(RunLogger(uri, run_id), recs, {})
        sent, dropped = sent + s, dropped + d
    Path(path).unlink(missing_ok=True)
    return sent, dropped


def _refused(e: BaseException) -> bool:
    """400 (bad parameter) or 404 (run deleted): the same request would fail again."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.get_http_status_code() in (400, 404)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return redact(text[:200])
