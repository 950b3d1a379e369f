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


class Proc:
    """One live process as ``/proc/<pid>/stat`` shows it; ``cmdline`` and ``environ`` on demand."""

    __slots__ = ("pid", "ppid", "pgid", "sid", "state")

    def __init__(self, pid: int, stat: bytes) -> None:
        fields = stat.rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces
        self.pid, self.state = pid, fields[0]
        self.ppid, self.pgid, self.sid = int(fields[1]), int(fields[2]), int(fields[3])

    def read(self, name: str) -> bytes:
        """``/proc/<pid>/<name>`` (b"" if the process is gone or not ours to read)."""
        try:
            with open(f"/proc/{self.pid}/{name}", "rb") as f:
                return f.read()
        except OSError:
            return b""


def processes() -> list[Proc]:
    """Every live process but this one and zombies (Linux ``/proc``): the one walker the
    tests use to find what a Ray, a server or a CLI left behind."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                proc = Proc(int(entry), f.read())
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if proc.state != b"Z":
            out.append(proc)
    return out


def descendants(pid: int | None = None) -> list[int]:
    """PIDs of every live process under ``pid`` (default: this one), at any depth."""
    root = os.getpid() if pid is None else pid
    procs = processes()
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def signal_all(pids: list[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``, skipping those already gone."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process left in session ``sid`` (a child started with
    ``start_new_session=True`` has ``sid == child.pid``); returns their PIDs. Ray's workers
    leave their parent's process group (setpgid) but not its session, so a process-group
    kill misses them; a worker still alive after its Ray is gone is found here."""
    found = [p.pid for p in processes() if p.sid == sid]
    signal_all(found, signal.SIGKILL)
    return found


def run_in_session(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a CLI, a script that starts its own Ray) in a new session, capturing its
    output, within ``timeout`` seconds; afterwards, whatever it exits with, every process it
    left in its session (Ray's raylet, GCS and workers) is killed by PID. A timeout raises
    ``subprocess.TimeoutExpired`` with the output so far, after the same cleanup."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc, grace=5.0)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_in_pty(cmd: list[str], *, timeout: float, **kwargs) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal (as in a person's terminal)
    in a new session; return ``(exit code, everything it wrote)``. Whatever happens, every
    process left in its session is killed by PID (as :func:`run_in_session`)."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True, **kwargs)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                stop_process_group(proc, grace=5.0)
                raise subprocess.TimeoutExpired(cmd, timeout, output=b"".join(chunks).decode(errors="replace"))
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        kill_session(proc.pid)


def start_mlflow_server(root: Path, artifacts: str, env: dict[str, str] | None = None,
                        timeout: float = 90, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1: sqlite store and log in ``root``, served artifacts
    at ``artifacts`` (a folder or s3://), on ``port`` (default: a free one; give the same one
    to start a stopped server again at its address). Returns ``(process, uri)`` once it
    answers; stop it with :func:`stop_process_group`."""
    port = port or free_port()
    with open(root / f"server-{port}-{time.monotonic_ns()}.log", "wb") as log:  # the child keeps its own descriptor
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
