"""Starting and stopping the real local servers the tests use (by PID, bounded in time)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, *, any_status: bool = False) -> None:
    """Poll ``url`` until it answers (200, or any HTTP status with ``any_status``), the
    process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
            time.sleep(0.3)
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM then SIGKILL the process group of ``proc`` (started with ``start_new_session=True``)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process left in session ``sid`` (a child started with
    ``start_new_session=True`` has ``sid == child.pid``); returns their PIDs. Ray's workers
    leave their parent's process group (setpgid) but not its session, so a process-group
    kill misses them; a worker still alive after its Ray is gone is found here."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == sid:  # field 6 of stat, the session id
            found.append(int(entry))
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found


def start_mlflow_server(root: Path, artifacts: str, env: dict[str, str] | None = None,
                        timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1: sqlite store and log in ``root``, served artifacts
    at ``artifacts`` (a folder or s3://). Returns ``(process, uri)`` once it answers; stop it
    with :func:`stop_process_group`."""
    port = free_port()
    with open(root / "server.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", artifacts, "--serve-artifacts", "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=timeout, proc=proc)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, uri
