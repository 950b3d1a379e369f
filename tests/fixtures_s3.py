"""A real S3 API for tests: moto's standalone server on 127.0.0.1, started once a session.

Registered from conftest.py with ``pytest_plugins = ["fixtures_s3"]``.

- ``moto_s3``: starts ``moto_server`` on a free port (bounded wait), points the AWS env
  vars at it for the session (restored afterwards), yields the endpoint URL and stops the
  process by its PID.
- ``s3_bucket``: a fresh, empty bucket per test; yields ``"s3://<bucket>"``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(port: int) -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        found = shutil.which("moto_server")
        exe = Path(found) if found else None  # type: ignore[assignment]
    base = [str(exe)] if exe else [sys.executable, "-m", "moto.server"]
    return base + ["-H", "127.0.0.1", "-p", str(port)]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"moto_server at {url} did not answer within {STARTUP_TIMEOUT_S:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """Endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server for this session."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(_server_command(port), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(endpoint + "/", proc, log)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            # Anything that would send boto3 or pyarrow elsewhere goes for the session.
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
                mp.delenv(name, raising=False)
            yield endpoint
    finally:
        _stop(proc)


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh empty bucket on the moto server; yields ``"s3://<bucket>"``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"
