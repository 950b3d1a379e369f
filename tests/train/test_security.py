"""Secrets are found nowhere (RELIABILITY.md row 18): a canary planted where secrets live.

Canaries: ``AWS_SECRET_ACCESS_KEY`` and ``MLFLOW_TRACKING_PASSWORD`` in the environment of
a pre-training run, and a password inside a config value (``tracking.tracking_uri =
http://bob:<canary>@127.0.0.1:<port>``, which MLflow's client accepts). The run is a real
one: shards and checkpoints in S3 (moto; it does not check keys), a real ``mlflow server``
of this test's own, and its own local Ray in a subprocess (workers see the env it sets;
the session ``ray_local`` would not). Then every place a secret could land is searched:
MLflow params, tags, metrics, every artifact (downloaded), the server's database and
artifact store and log, every file of that Ray's temp dir (session logs, job table),
every object in the bucket (checkpoints), and the run's stdout/stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from cola_ray.train import tracking
from cola_ray.config import load_config

RUN_TIMEOUT_S = 300

RUN_SCRIPT = r"""
import json, sys
import ray
from cola_ray.config import load_config
from cola_ray.train.trainer import fit
temp_dir, out, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
try:
    result = fit(load_config(config, overrides))
    jobs = ray._private.state.state.job_table()
    with open(out, "w") as f:
        json.dump({"run_id": result.mlflow_run_id, "checkpoint": result.checkpoint, "jobs": jobs}, f,
                  default=str)
finally:
    ray.shutdown()
"""


def test_redact_masks_passwords_in_urls():
    assert tracking.redact("http://bob:s3cr3t@host:5000/x") == "http://bob:***@host:5000/x"
    assert tracking.redact("see https://u:p@a.b and s3+http://k:v@c") == "see https://u:***@a.b and s3+http://k:***@c"
    assert tracking.redact("http://host:5000") == "http://host:5000"
    assert tracking.redact("s3://bucket/a:b@c") == "s3://bucket/a:b@c"  # no user-info: a key, untouched
    assert tracking.redact(3) == 3
    assert tracking.redact_tree({"a": ["http://u:p@h"], "b": {"c": "http://u:p@h"}}) == {
        "a": ["http://u:***@h"], "b": {"c": "http://u:***@h"}}
    url = tracking.run_url("http://u:canary@127.0.0.1:5000", "r1", "e")
    assert "canary" not in url and url.startswith("http://u:***@127.0.0.1:5000/")


def test_params_of_a_run_mask_credentials_in_config_urls(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["data.shards=x", "data.s3_endpoint_url=http://key:canary-s3@127.0.0.1:9000",
                             f"tracking.tracking_uri={uri}"])
    uri, run_id, _ = tracking.start_or_resume_run(cfg, "r")
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["data.s3_endpoint_url"] == "http://key:***@127.0.0.1:9000"
    assert not any("canary" in v for v in params.values())


@pytest.mark.slow
def test_canary_secrets_found_nowhere(moto_s3, s3_bucket, tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient
    from helpers.services import run_in_session, start_mlflow_server, stop_process_group

    from cola_ray.data import storage
    from helpers.factories import make_shards

    tag = uuid.uuid4().hex[:12]
    canaries = {
        "aws": f"canary-aws-{tag}",
        "mlflow-password": f"canary-mlflowpw-{tag}",
        "uri-password": f"canary-uripw-{tag}",
    }
    make_shards(tmp_path, n_clips=16, seconds=2.0, seed=4, max_samples=8, out=f"{s3_bucket}/shards", labels=False)

    server_root = tmp_path / "mlflow-server"
    server_root.mkdir()
    server, server_uri = start_mlflow_server(server_root, str(server_root / "artifacts"))
    host = server_uri[len("http://"):]
    # Short: Ray's socket paths must stay under the OS limit.
    ray_tmp = Path(tempfile.mkdtemp(prefix="crsec-", dir="/tmp"))
    try:
        secret_uri = f"http://bob:{canaries['uri-password']}@{host}"
        overrides = [
            f"data.shards={s3_bucket}/shards", "data.shuffle_buffer=16", "data.decode_num_cpus=0.5",
            "model.encoder=test_efficientnet", "model.drop_path_rate=0.0", "model.proj_dim=16",
            "train.batch_size=8", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.max_steps=4",
            "train.log_every_steps=1", "train.checkpoint_every_steps=2", "train.max_failures=0",
            "name=secret-run", f"storage_path={s3_bucket}/runs", "tracking.experiment=security",
        ]
        # The secret URI reaches the config through a ${VAR} reference, as a user would pass it
        # (a command-line override would put it in the job's entrypoint, for all to see).
        config = tmp_path / "secret.yaml"
        config.write_text("tracking:\n  tracking_uri: ${SECRET_TRACKING_URI}\n")
        env = {**os.environ, "SECRET_TRACKING_URI": secret_uri, "AWS_SECRET_ACCESS_KEY": canaries["aws"],
               "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": canaries["mlflow-password"]}
        out = ray_tmp / "result.json"
        try:  # its own session: the Ray it starts is stopped by PID whatever happens
            done = run_in_session([sys.executable, "-c", RUN_SCRIPT, str(ray_tmp), str(out), str(config),
                                   json.dumps(overrides)], timeout=RUN_TIMEOUT_S, env=env, cwd=tmp_path)
        except subprocess.TimeoutExpired as e:
            pytest.fail("run timed out:\n" + (e.stderr or "")[-6000:])
        assert done.returncode == 0, done.stderr[-8000:]
        stdout, stderr = done.stdout.encode(), done.stderr.encode()
        res = json.loads(out.read_text())
        # Also the S3 pre-training path: shards read from the bucket, checkpoints written there.
        assert res["checkpoint"] == f"{s3_bucket}/runs/secret-run/checkpoint_000000004"
        ckpt_files = storage.list_files(res["checkpoint"], suffix="")
        assert {f.rsplit("/", 1)[1] for f in ckpt_files} >= {"model.safetensors", "optimizer.pt", "state.json"}

        places: dict[str, bytes] = {"stdout": stdout, "stderr": stderr}
        # MLflow: the run's params, tags, metric keys, experiment; every artifact.
        client = MlflowClient(server_uri)
        run = client.get_run(res["run_id"])
        assert run.data.params["tracking.tracking_uri"] == f"http://bob:***@{host}"
        places["mlflow params"] = json.dumps(run.data.params).encode()
        places["mlflow tags"] = json.dumps(run.data.tags).encode()
        places["mlflow metric keys"] = json.dumps(sorted(run.data.metrics)).encode()
        places["mlflow experiment"] = repr(client.get_experiment(run.info.experiment_id)).encode()
        downloaded = Path(client.download_artifacts(res["run_id"], "", str(tmp_path / "artifacts")))
        places.update(_files(downloaded, "mlflow artifact"))
        # MLflow 3 keeps a logged model beside the run's artifacts: download it too.
        import mlflow.artifacts

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(server_uri)  # models:/ URIs resolve against it
        try:
            model_dir = mlflow.artifacts.download_artifacts(
                artifact_uri=run.data.tags["cola_ray.encoder_uri"], dst_path=str(tmp_path / "model"))
        finally:
            mlflow.set_tracking_uri(previous)
        places.update(_files(Path(model_dir), "mlflow model"))
        assert any("checkpoints" in k for k in places) and any("MLmodel" in k for k in places)
        # The server's own store (database, artifact folder, log).
        places.update(_files(server_root, "mlflow server"))
        # That Ray's temp dir: session logs of every process, and the job table.
        places.update(_files(ray_tmp, "ray temp"))
        assert any("/logs/" in k for k in places), "no Ray session log found to search"
        # Every object in the bucket (shards, checkpoints).
        s3 = boto3.client("s3")
        bucket = s3_bucket[len("s3://"):]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                places[f"s3 {obj['Key']}"] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        assert any("state.json" in k for k in places)

        leaks = [(what, name) for name, blob in places.items() for what, c in canaries.items()
                 if c.encode() in blob]
        assert not leaks, f"canary found: {leaks}"
        # The search itself works: the (redacted) URI is found where expected.
        assert f"bob:***@{host}".encode() in places["stdout"]
    finally:
        stop_process_group(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _files(root: Path, label: str) -> dict[str, bytes]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                out[f"{label} {path}"] = path.read_bytes()
            except OSError:
                pass  # sockets, files removed while walking
    return out
