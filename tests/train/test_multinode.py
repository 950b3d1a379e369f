"""Multi-node pre-training on this machine: a Ray ``Cluster`` of separate raylets.

Node roles as on the real cluster (cluster/aws.yaml): a head (driver, 1 CPU), a
"gpu-node" (custom resource ``gpu-node``; stands in for a GPU node) where the training
workers must run, and a CPU-only "decode-node" (``decode-node``) where the decode tasks
must run. Checkpoints go to S3 (moto), metrics to a real ``mlflow server`` on 127.0.0.1
whose artifacts are in that S3 too.

Mid-run the gpu-node is killed (``Cluster.remove_node(allow_graceful=False)`` kills its
processes by PID) and a fresh gpu-node joins; with ``train.max_failures > 0`` Ray Train
restarts the workers there from the last checkpoint in S3 and the run finishes. Checked:
placement (Ray state API, node ids), the final step, no step lost, and that the global
step never went back by more than two checkpoint intervals (MLflow metric history).

About 80 s on 2 cores; part of the default run (``COLA_RAY_MULTINODE=0`` skips it). With
Ray's default node health checks, four raylets, a moto S3 and an MLflow server on two
shared cores missed heartbeats often enough that this test failed 3 of 5 runs (a live
node marked dead under load); with the relaxed checks of :data:`HEALTH_CHECKS` it has
passed every run since, inside full suites too.

The cluster runs in a subprocess (this file run as a script) so that it never meets the
session's ``ray_local`` in the pytest process; the subprocess shuts the cluster down in
a ``finally`` and is bounded by a timeout, after which its process group is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("COLA_RAY_MULTINODE") == "0", reason="COLA_RAY_MULTINODE=0"),
]

RUN_TIMEOUT_S = 480
MAX_STEPS = 30
CKPT_EVERY = 5
KILL_AFTER_CHECKPOINT = 10
# The GCS marks a node dead after `threshold` failed health checks, each failing when the
# raylet does not answer within `timeout`. Ray's defaults (3 s period, 10 s timeout, 5
# failures) mark a live raylet dead when four raylets share two busy cores; here a check
# may wait 60 s for an answer, while a killed raylet (connection refused at once) is still
# found dead within ~10 checks x 1 s.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "60000",
                 "RAY_health_check_failure_threshold": "10"}


def test_multinode_placement_s3_mlflow_and_node_loss(moto_s3, s3_bucket, tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient
    from helpers.services import run_in_session, start_mlflow_server, stop_process_group

    from cola_ray.data import storage
    from helpers.factories import make_shards

    make_shards(tmp_path, n_clips=48, seconds=2.0, seed=5, max_samples=8, out=f"{s3_bucket}/shards")

    # An MLflow server whose artifacts live in the same S3.
    server, uri = start_mlflow_server(tmp_path, f"{s3_bucket}/mlflow",
                                      env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": moto_s3})
    out = tmp_path / "result.json"
    args = {"shards": f"{s3_bucket}/shards", "storage": f"{s3_bucket}/runs", "tracking_uri": uri,
            "out": str(out), "bucket": s3_bucket[len("s3://"):]}
    ray_tmp = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")
    try:
        t0 = time.monotonic()
        # Its own Ray temp root: the Cluster writes a "current cluster" file there, not in
        # /tmp/ray, where other Rays on this machine would find it and follow it.
        try:  # its own session: the Cluster's nodes and workers are stopped by PID whatever happens
            done = run_in_session([sys.executable, __file__, json.dumps(args)], timeout=RUN_TIMEOUT_S, cwd=tmp_path,
                                  env={**os.environ, "RAY_TMPDIR": ray_tmp, **HEALTH_CHECKS})
        except subprocess.TimeoutExpired as e:
            pytest.fail("multi-node run timed out:\n" + ((e.output or "") + (e.stderr or ""))[-6000:])
        text = done.stdout + done.stderr
        (tmp_path / "run.log").write_text(text)  # kept for diagnosis
        assert done.returncode == 0, text[-8000:]
        res = json.loads(out.read_text())
        print(f"multi-node run: {time.monotonic() - t0:.0f}s", res["timings"])

        # Placement: every training worker on a gpu-node, every decode task on the decode node.
        gpu_nodes = {res["nodes"]["gpu-1"], res["nodes"]["gpu-2"]}
        assert res["train_worker_nodes"], "no training worker seen"
        assert set(res["train_worker_nodes"]) <= gpu_nodes, res
        assert set(res["train_worker_nodes"]) == gpu_nodes, "workers not on gpu-1, then restarted on gpu-2"
        assert res["decode_task_nodes"], "no decode task seen"
        assert set(res["decode_task_nodes"]) == {res["nodes"]["decode"]}, res

        # The run finished at the last step, its checkpoints in S3.
        run_dir = f"{s3_bucket}/runs/mn-run"
        assert res["checkpoint"] == f"{run_dir}/checkpoint_{MAX_STEPS:09d}"
        files = storage.list_files(res["checkpoint"], suffix="")
        assert {f.rsplit("/", 1)[1] for f in files} >= {"model.safetensors", "optimizer.pt", "state.json"}

        # MLflow: every step logged; the step never went back by more than a checkpoint interval.
        client = MlflowClient(uri)
        run = client.get_run(res["run_id"])
        assert run.info.status == "FINISHED"
        history = sorted(client.get_metric_history(res["run_id"], "loss"), key=lambda m: (m.timestamp, m.step))
        steps = [m.step for m in history]
        assert set(steps) == set(range(1, MAX_STEPS + 1)), steps
        assert max(steps) == MAX_STEPS and steps[-1] == MAX_STEPS
        drops = [a - b for a, b in zip(steps, steps[1:]) if b < a]
        print("steps as logged:", steps)
        # Ray Train commits a reported checkpoint only at its next worker poll (every 2 s,
        # later under load): a node lost in that window resumes from the one before. So the
        # bound here is two intervals; one interval is the reliability target (issue 6).
        assert all(d <= 2 * CKPT_EVERY for d in drops), f"went back by {drops}: {steps}"

        # MLflow's artifacts (checkpoint copies, the encoder) are in S3.
        keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
            Bucket=args["bucket"], Prefix="mlflow/") for o in page.get("Contents", [])]
        assert any(f"checkpoints/checkpoint_{MAX_STEPS:09d}/model.safetensors" in k for k in keys), keys[:20]
        assert any("/encoder/" in k or "/models/" in k for k in keys), keys[:40]
    finally:
        stop_process_group(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---- the subprocess: cluster, run, node loss ------------------------------------------------

def _main(args: dict) -> None:
    import threading

    import boto3
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from cola_ray.config import load_config
    from cola_ray.train.trainer import fit

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0,
    })
    try:
        gpu1 = cluster.add_node(num_cpus=2, resources={"gpu-node": 2})
        decode = cluster.add_node(num_cpus=2, resources={"decode-node": 4})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        timings["cluster_up"] = time.monotonic() - t0
        nodes = {"head": cluster.head_node.node_id, "gpu-1": gpu1.node_id, "decode": decode.node_id}

        cfg = load_config(None, [
            f"data.shards={args['shards']}", "data.shuffle_buffer=32", "data.decode_num_cpus=0.5",
            "data.decode_resources={decode-node: 1}",
            "model.encoder=test_efficientnet", "model.drop_path_rate=0.0", "model.proj_dim=32",
            "train.batch_size=8", "train.num_workers=2", "train.cpus_per_worker=0.5",
            "train.resources_per_worker={gpu-node: 1}", "train.epochs=1000",
            f"train.max_steps={MAX_STEPS}", "train.log_every_steps=1",
            f"train.checkpoint_every_steps={CKPT_EVERY}", "train.max_failures=3",
            "name=mn-run", f"storage_path={args['storage']}", f"tracking.tracking_uri={args['tracking_uri']}",
            "tracking.experiment=multinode", "tracking.log_checkpoints=true", "tracking.log_model=true",
        ])
        box: dict = {}

        def run() -> None:
            try:
                box["result"] = fit(cfg, echo=print)
            except BaseException as e:  # reported by the main thread
                box["error"] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        # Wait until Ray Train has COMMITTED a checkpoint (its manager's snapshot in S3 names
        # it), then lose the gpu-node at once. A checkpoint folder that is merely uploaded is
        # not enough: the controller registers it on its next poll of the workers
        # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), and a node lost before that resumes from
        # the checkpoint before (seen here: back from step 15 to 6 with checkpoints every 5).
        s3 = boto3.client("s3")
        snapshot = "runs/mn-run/checkpoint_manager_snapshot.json"
        wanted = f"checkpoint_{KILL_AFTER_CHECKPOINT:09d}".encode()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and thread.is_alive():
            try:
                if wanted in s3.get_object(Bucket=args["bucket"], Key=snapshot)["Body"].read():
                    break
            except s3.exceptions.NoSuchKey:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{wanted!r} never committed before the deadline; run error: {box.get('error')!r}")
        timings["checkpoint_committed"] = time.monotonic() - t0
        cluster.remove_node(gpu1, allow_graceful=False)  # kills the node's raylet and workers by PID
        timings["node_killed"] = time.monotonic() - t0
        time.sleep(2.0)
        gpu2 = cluster.add_node(num_cpus=2, resources={"gpu-node": 2})
        nodes["gpu-2"] = gpu2.node_id

        thread.join(timeout=360)
        if thread.is_alive():
            raise RuntimeError("fit did not finish within 360 s after the node loss")
        if "error" in box:
            raise box["error"]
        timings["finished"] = time.monotonic() - t0
        time.sleep(2.0)  # task events reach the GCS once a second
        result = box["result"]
        # Dead actors stay listed (with their node): the first group, lost with gpu-1, too.
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True)
        tasks = list_tasks(limit=10000, detail=True, raise_on_missing_output=False)
        decode_nodes = sorted({t.node_id for t in tasks if "decode_and_crop" in (t.name or "") and t.node_id})
        Path(args["out"]).write_text(json.dumps({
            "nodes": nodes,
            "train_worker_nodes": sorted({a.node_id for a in workers if a.node_id}),
            "decode_task_nodes": decode_nodes,
            "decode_task_names": sorted({t.name for t in tasks if "decode_and_crop" in (t.name or "")}),
            "checkpoint": result.checkpoint,
            "run_id": result.mlflow_run_id,
            "timings": {k: round(v, 1) for k, v in timings.items()},
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package
    _main(json.loads(sys.argv[1]))
