"""A real S3 API for tests: moto's standalone server on 127.0.0.1, started once a session.

Registered from conftest.py with ``pytest_plugins = ["helpers.fixtures_s3"]``.

- ``moto_s3``: starts ``moto_server`` on a free port (bounded wait), points the AWS env
  vars at it for the session (restored afterwards), yields the endpoint URL and stops the
  process by its PID.
- ``s3_bucket``: a fresh, empty bucket per test; yields ``"s3://<bucket>"``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers.services import free_port, stop_process_group, wait_http

STARTUP_TIMEOUT_S = 30.0


def _server_command(port: int) -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        found = shutil.which("moto_server")
        exe = Path(found) if found else None  # type: ignore[assignment]
    base = [str(exe)] if exe else [sys.executable, "-m", "moto.server"]
    return base + ["-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """Endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server for this session."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(_server_command(port), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(endpoint + "/", STARTUP_TIMEOUT_S, proc, any_status=True)
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
        stop_process_group(proc)


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh empty bucket on the moto server; yields ``"s3://<bucket>"``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=name)
    yield f"s3://{name}"
