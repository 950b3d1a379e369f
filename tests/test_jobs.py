"""``ray job submit`` of jobs/pretrain.py to a real Ray head started with ``ray start``.

The cluster is this test's own: ``ray start --head --block`` on 127.0.0.1 with free ports and
a dedicated short ``--temp-dir``, token authentication on as a user runs it (a fresh token in
a file, ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` for the head and every client), the
job's ``python`` the venv's (its bin dir first on the head's PATH, which the job driver
inherits). It coexists with the session's ``ray_local`` and any other Ray on the machine.

It is stopped by its own means, never ``ray stop`` (which stops every Ray on the machine):
SIGTERM to the ``ray start --block`` process, whose handler tears down the processes it
started; then any process that still belongs to this cluster (its process group, the marker
variable every process of the cluster inherits, or its temp dir on the command line) is
terminated by PID.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.services import free_port, processes, signal_all

pytestmark = pytest.mark.slow

from helpers.paths import BIN, REPO
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
MARKER = "COLA_RAY_TEST_CLUSTER"
"""Set in ``ray start``'s environment only; every process of that cluster inherits it."""


@dataclass
class Head:
    dashboard_url: str
    temp_dir: Path
    token: str
    env: dict[str, str]
    """Environment for ``ray`` CLI clients of this cluster (token auth, no RAY_ADDRESS)."""

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def ray(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)


def _client_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_dashboard(url: str, headers: dict[str, str], timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if _http_status(url + "/api/version", headers) == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def _cluster_pids(temp_dir: Path, pgid: int) -> list[int]:
    """Live processes of this cluster: its process group, marker variable or temp dir."""
    marker = f"{MARKER}={temp_dir}".encode()
    needle = str(temp_dir).encode() + b"/"
    return [p.pid for p in processes()
            if p.pgid == pgid or needle in p.read("cmdline") or marker in p.read("environ").split(b"\0")]


def _stop_cluster(proc: subprocess.Popen, temp_dir: Path) -> list[int]:
    """Stop this cluster only; returns the PIDs that outlived ``ray start``'s own teardown."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Node's SIGTERM handler kills the processes it started
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if not sys.platform.startswith("linux"):
        return []
    time.sleep(1.0)  # workers leave by themselves once their raylet is gone
    leftovers = _cluster_pids(temp_dir, proc.pid)
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _cluster_pids(temp_dir, proc.pid)
        if not pids:
            break
        signal_all(pids, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _cluster_pids(temp_dir, proc.pid):
            time.sleep(0.2)
    still = _cluster_pids(temp_dir, proc.pid)
    assert not still, f"processes of the test cluster survived SIGKILL: {still}"
    return leftovers


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of its own (``ray start --head --block``), token auth on; stopped by PID.
    Shared by this module's jobs, as one cluster serves many jobs."""
    tmp_path = tmp_path_factory.mktemp("ray-head")
    # Ray puts unix sockets under <temp-dir>/session_<date>_<pid>/sockets/: keep the root short.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayj-", dir="/tmp" if os.path.isdir("/tmp") else None))
    assert len(str(temp_dir)) <= 40, temp_dir
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_path = tmp_path / "ray_auth_token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    env = _client_env(token_path)

    gcs_port, dash_port, client_port, agent_port = _distinct_ports(4)
    cmd = [str(BIN / "ray"), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--include-dashboard", "true",
           "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
           "--num-cpus", "2", "--object-store-memory", str(512 * 1024**2),
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    head_env = {**env, MARKER: str(temp_dir),
                # No drain phase on SIGTERM (it is for Serve; it would wait 30 s here).
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    start_log = tmp_path / "ray-start.log"
    url = f"http://127.0.0.1:{dash_port}"
    with open(start_log, "wb") as log:
        proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    try:
        _wait_dashboard(url, {"Authorization": f"Bearer {token}"}, START_TIMEOUT_S, proc, start_log)
        yield Head(url, temp_dir, token, env)
    finally:
        try:
            leftovers = _stop_cluster(proc, temp_dir)
            if leftovers:
                print(f"test cluster: terminated {len(leftovers)} process(es) left after ray start's teardown")
        finally:
            logs = temp_dir / "session_latest" / "logs"
            if logs.is_dir():
                shutil.copytree(logs, tmp_path / "ray-logs", symlinks=True, ignore_dangling_symlinks=True,
                                dirs_exist_ok=True)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _job_logs(client, submission_id: str) -> str:
    try:
        return client.get_job_logs(submission_id)[-6000:]
    except Exception as e:  # the job may not exist if the submission itself failed
        return f"(no job logs: {e})"


def _submit(head: Head, script: str, config: str, *overrides: str) -> str:
    """``ray job submit`` of ``script --config config overrides`` with the repo as working dir;
    waits for the end and asserts SUCCEEDED; returns the submission id."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submission_id = f"cola-{Path(script).stem}-{uuid.uuid4().hex[:8]}"
    submit = ["job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
              "--working-dir", str(REPO), "--", "python", script, "--config", config, *overrides]
    client = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)
    started = time.monotonic()
    try:
        done = head.ray(*submit, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ray job submit did not finish within {JOB_TIMEOUT_S:.0f}s\n"
                    f"--- client ---\n{(e.stdout or b'')[-3000:]!r}\n--- job logs ---\n"
                    f"{_job_logs(client, submission_id)}")
    elapsed = time.monotonic() - started
    status = client.get_job_status(submission_id)
    assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"rc={done.returncode} status={status}\n--- client ---\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        f"\n--- job logs ---\n{_job_logs(client, submission_id)}")
    print(f"job {submission_id} SUCCEEDED in {elapsed:.0f}s")
    return submission_id


def test_ray_job_submit_smoke_config(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    # Token auth is on: the dashboard refuses a request without the token (and a wrong one).
    assert _http_status(ray_head.dashboard_url + "/api/jobs/") == 401
    assert _http_status(ray_head.dashboard_url + "/api/jobs/", {"Authorization": "Bearer nope"}) == 403

    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    # The submitting shell's environment does not reach the job: paths go as overrides.
    submission_id = _submit(ray_head, "jobs/pretrain.py", "jobs/configs/smoke.yaml",
                            f"storage_path={storage}", f"tracking.tracking_uri=sqlite:///{db}", "name=smoke-job")
    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.auth_headers)

    def job_logs() -> str:
        return _job_logs(client, submission_id)

    # The CLI's own status query, authenticated the same way.
    st = ray_head.ray("job", "status", "--address", ray_head.dashboard_url, submission_id, timeout=60)
    assert st.returncode == 0 and "succeeded" in (st.stdout + st.stderr), st.stdout + st.stderr

    # The working dir upload: the repo without .venv, .git or anything .gitignore'd; small.
    unpacked = ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    (pkg,) = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
    assert (pkg / "jobs" / "pretrain.py").is_file() and (pkg / "cola_ray").is_dir()
    assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
    sizes = sorted(((_dir_bytes(p) if p.is_dir() else p.stat().st_size), p.name) for p in pkg.iterdir())
    assert _dir_bytes(pkg) < 20 * 1024**2, sizes[-5:]

    # MLflow (sqlite under tmp_path): one finished run, loss logged every 2 steps of 6.
    mlflow = MlflowClient(f"sqlite:///{db}")
    exp = mlflow.get_experiment_by_name("cola-ray-smoke")
    assert exp is not None, job_logs()
    (run,) = mlflow.search_runs([exp.experiment_id])
    assert run.info.run_name == "smoke-job" and run.info.status == "FINISHED"
    assert run.data.tags["cola_ray.run_dir"] == str(storage / "smoke-job")
    loss = sorted(mlflow.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [2, 4, 6], [(m.step, m.value) for m in loss]
    assert all(math.isfinite(m.value) for m in loss)
    assert json.loads(run.data.params["train.max_steps"]) == 6

    # Checkpoints under the storage path (every 3 steps).
    for step in (3, 6):
        assert (storage / "smoke-job" / f"checkpoint_{step:09d}" / "model.safetensors").is_file()


def test_ray_job_submit_downstream_suite(ray_head, tmp_path):
    """The whole downstream suite as a job: a generated task, the four baselines (probe sweeps
    and fine-tuning sweeps), the table; a resubmission skips the finished cells."""
    import csv

    from mlflow.tracking import MlflowClient

    from helpers.factories import finetuned_accuracy, hand_made_checkpoint, logged_probe_accuracy

    encoder = hand_made_checkpoint(tmp_path / "ckpt")
    db, report_dir = tmp_path / "mlflow.db", tmp_path / "report"
    overrides = (f"encoder_ref={encoder}", f"tracking_uri=sqlite:///{db}", f"storage_path={tmp_path / 'runs'}",
                 f"report_dir={report_dir}", f"probe.cache_dir={tmp_path / 'cache'}",
                 # Smaller than the shipped smoke config (CI's time budget): one probe trial, one epoch.
                 "probe.num_samples=1", "finetune.epoch_choices=[1]")
    _submit(ray_head, "jobs/downstream.py", "jobs/configs/downstream-smoke.yaml", *overrides)

    with open(report_dir / "report.csv", newline="") as f:
        rows = {row["task"]: row for row in csv.DictReader(f)}
    columns = ["random init", "supervised", "COLA frozen", "COLA fine-tuned"]
    assert set(rows) == {"synthetic", "Average"}
    assert (report_dir / "report.md").read_text().splitlines()[0] == "| task | " + " | ".join(columns) + " |"

    mlflow = MlflowClient(f"sqlite:///{db}")
    exp = mlflow.get_experiment_by_name("cola-ray-downstream-smoke")
    parents = mlflow.search_runs([exp.experiment_id], "tags.`cola_ray.kind` = 'sweep'")
    assert sorted(r.data.tags["cola_ray.baseline"] for r in parents) == sorted(columns)
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in parents)
    # Probe sweeps embed once per encoder; fine-tuning sweeps retrain their selected config once.
    sweeps = {r.data.tags["cola_ray.baseline"]: r.data.tags.get("cola_ray.downstream.sweep", "probe") for r in parents}
    assert sweeps == {"random init": "probe", "COLA frozen": "probe", "supervised": "finetune",
                      "COLA fine-tuned": "finetune"}
    # Each cell of the table is its sweep's test accuracy in percent, and that accuracy is what
    # the sweep saved gives on the task's 16 test clips (120 clips, 4 classes, 4 test clips
    # each), recomputed here: the probe layer on the cached embeddings, the fine-tuned model
    # (the selected run's Ray Train checkpoint) on the task's shards.
    for parent in parents:
        column, accuracy = parent.data.tags["cola_ray.baseline"], parent.data.metrics["test_accuracy"]
        assert float(rows["synthetic"][column]) == pytest.approx(100 * accuracy, abs=0.005), column
        if sweeps[column] == "probe":
            assert parent.data.metrics["test_clips"] == 16, column
            assert logged_probe_accuracy(mlflow, parent.info.run_id) == pytest.approx(accuracy), column
        else:
            selected = mlflow.get_run(parent.data.tags["cola_ray.selected_run_id"])
            assert selected.data.metrics["test_clips"] == 16, column
            run_dir = tmp_path / "runs" / "finetune" / selected.info.run_name  # Ray Train's, num_to_keep=1
            (saved,) = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
            assert finetuned_accuracy(saved, tmp_path / "runs" / "_synthetic" / "task") == pytest.approx(accuracy), column
    assert mlflow.search_runs([exp.experiment_id], "tags.`cola_ray.kind` = 'report'")

    # Resubmitted, the suite finds every cell finished and runs none again.
    submission_id = _submit(ray_head, "jobs/downstream.py", "jobs/configs/downstream-smoke.yaml", *overrides)
    logs = ray_head_client(ray_head).get_job_logs(submission_id)
    assert logs.count("already in 'cola-ray-downstream-smoke', skipped") == 4, logs
    assert len(mlflow.search_runs([exp.experiment_id], "tags.`cola_ray.kind` = 'sweep'")) == 4


def ray_head_client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)
