"""Training faults injected for real (issue 6 / shared/RELIABILITY.md rows 5, 9, 10, 11, 15, 19).

Every fault is the real thing, never a mock of Ray or MLflow:

- a non-finite loss on ONE of two real gloo ranks (a NaN waveform fed straight to the model,
  past the pipeline that would reject it): both ranks skip the step together, no deadlock;
- a training worker (world rank 0, the one that logs) SIGKILLed by PID mid-epoch: Ray Train
  restarts the group from the last checkpoint, the MLflow run has every step exactly once;
- a Ray Data decode worker SIGKILLed by PID while decoding: the task is retried, training
  goes on without a restart;
- a shard that is a named pipe nobody writes to (opening it blocks in the kernel): the
  step watchdog fails the run naming the rank, long before Ray's 30-minute barrier;
- the real ``mlflow server`` process stopped mid-run and started again on the same port
  and store: no step waits for it, no step lost or logged twice; a spool left behind is
  delivered by ``cola-ray replay-metrics``;
- a run resumed with another number of workers: the global batch (negatives) is kept and
  the loss goes on where it was; where the number of negatives would change, it is refused.

Processes are found through /proc among this test process's own descendants (the
session's local Ray), so other Rays on the machine are never touched. Figures are printed
(``pytest -s`` shows them) for the README's reliability section.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from helpers.paths import BIN
from helpers.services import descendants, free_port, start_mlflow_server, stop_process_group

from cola_ray.config import ConfigError
from cola_ray.train.trainer import fit
from helpers.factories import make_shards, tiny_config

pytestmark = pytest.mark.slow

CKPT_EVERY = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """128 one-second clips in 8 shards: 8 steps of 16 pairs per epoch."""
    root = tmp_path_factory.mktemp("rel-corpus")
    return make_shards(root, n_clips=128, seconds=1.2, seed=4, max_samples=16)


def tiny(tmp_path, shards_path, tracking_uri, *extra):
    return tiny_config(tmp_path, shards_path, tracking_uri, "data.shuffle_buffer=32", "model.proj_dim=32",
                       "train.epochs=1000", f"train.checkpoint_every_steps={CKPT_EVERY}",
                       "train.keep_checkpoints=20", "tracking.experiment=test-reliability",
                       "tracking.log_model=false", "tracking.log_checkpoints=false", *extra)


class Background:
    """``fit(cfg)`` in a thread of this process (the session's Ray), joined with a bound."""

    def __init__(self, cfg):
        self.result = self.error = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self.thread.start()

    def _run(self, cfg):
        try:
            self.result = fit(cfg, echo=lambda *_: None)
        except BaseException as e:  # re-raised by join()
            self.error = e
        finally:
            self.ended = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"fit still running after {timeout:.0f}s"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(predicate, timeout: float, what: str, run: Background | None = None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run is not None and not run.alive:
            run.join(0)  # raises the run's error, if any
            pytest.fail(f"the run ended before {what}")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "loss")]


def spooled_steps(path: Path) -> list[int]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x)["step"] for x in lines if x.strip() and '"step"' in x]


def epoch_tallies(client: MlflowClient, run_id: str) -> dict[int, tuple[int, int]]:
    """Epoch-end step -> (distinct clips trained on in that epoch, repeats)."""
    clips = {m.step: int(m.value) for m in client.get_metric_history(run_id, "data/epoch_clips")}
    repeats = {m.step: int(m.value) for m in client.get_metric_history(run_id, "data/epoch_repeats")}
    return {s: (clips[s], repeats.get(s, -1)) for s in clips}


def run_id_of(client: MlflowClient, name: str) -> str | None:
    exp = client.get_experiment_by_name("test-reliability")
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`cola_ray.run_name` = '{name}'")
    return found[0].info.run_id if found else None


# ---- processes of this test's own Ray, by PID --------------------------------------------

def my_descendants() -> list[int]:
    """PIDs of every live process under this one (the local Ray's raylet and its workers)."""
    return descendants()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def holds_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# ---- row 5: a non-finite loss on one rank: both skip, no deadlock ------------------------------

def _nonfinite_rank(rank: int, port: int, out: str) -> None:
    import dataclasses
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cola_ray.config import FeatureConfig, ModelConfig
    from cola_ray.model.cola import ColaModel
    from cola_ray.train.loop import optimizer_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = ColaModel(FeatureConfig(), dataclasses.replace(
            ModelConfig(), encoder="test_efficientnet_gn", drop_path_rate=0.0, proj_dim=16))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(rank)
        anchor, positive = 0.1 * torch.randn(3, 15600, generator=g), 0.1 * torch.randn(3, 15600, generator=g)
        before = [p.detach().clone() for p in model.parameters()]
        bad = anchor.clone()
        if rank == 1:
            bad[0, 100] = float("nan")  # only rank 1's loss is NaN; rank 0's stays finite
        out_bad = ddp(bad, positive)
        local_finite = bool(torch.isfinite(out_bad["loss"]))
        took_bad = optimizer_step(out_bad["loss"], opt, model, grad_clip=0.0)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        took_good = optimizer_step(ddp(anchor, positive)["loss"], opt, model, grad_clip=0.0)
        changed = not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"local_finite": local_finite, "took_bad": took_bad, "unchanged": unchanged,
                    "took_good": took_good, "changed": changed, "params": flat}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_nonfinite_loss_on_one_rank_is_skipped_by_both(tmp_path):
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_nonfinite_rank, args=(r, port, str(tmp_path)), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
        assert not any(p.is_alive() for p in procs), "a rank hung: the ranks did not agree to skip"
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["local_finite"] and not r1["local_finite"], "the fault must hit rank 1 only"
    assert not r0["took_bad"] and not r1["took_bad"], "both ranks skip the step"
    assert r0["unchanged"] and r1["unchanged"], "no parameter moved on either rank"
    assert r0["took_good"] and r1["took_good"] and r0["changed"] and r1["changed"]
    assert torch.equal(r0["params"], r1["params"]), "the replicas stay identical"


# ---- row 9: a training worker SIGKILLed mid-epoch ---------------------------------------------

def test_training_worker_killed_resumes_with_every_step_logged_once(ray_local, corpus, tmp_path, mlflow_server):
    max_steps, kill_at = 60, 25
    cfg = tiny(tmp_path, corpus, mlflow_server, "name=kill-train", f"train.max_steps={max_steps}",
               "train.max_failures=2")
    client = MlflowClient(mlflow_server)
    spool = tmp_path / "runs" / "kill-train" / "mlflow_spool"
    run = Background(cfg)
    run_id = wait_for(lambda: run_id_of(client, "kill-train"), 60, "the MLflow run", run)
    spool_file = spool / f"{run_id}.jsonl"

    def step_now() -> int:  # the step rank 0 has logged: MLflow lags; the spool holds the rest
        return max([*loss_steps(client, run_id), *spooled_steps(spool_file)], default=0)

    wait_for(lambda: step_now() >= kill_at, 120, f"step {kill_at}", run, poll=0.05)

    # World rank 0 is the worker that holds the run's spool file open (it logs to MLflow).
    rank0 = [p for p in my_descendants() if "RayTrainWorker" in cmdline(p) and holds_open(p, spool_file)]
    assert len(rank0) == 1, [(p, cmdline(p)) for p in my_descendants()]
    step_at_kill = step_now()
    kill(rank0[0])
    killed_at = time.time()

    result = run.join(240)
    took = time.monotonic() - run.started
    assert result.checkpoint.endswith(f"checkpoint_{max_steps:09d}")

    history = client.get_metric_history(run_id, "loss")
    counts = collections.Counter(m.step for m in history)
    duplicated = sorted(s for s, n in counts.items() if n > 1)
    missing = sorted(set(range(1, max_steps + 1)) - set(counts))
    assert not duplicated and not missing, f"duplicated {duplicated}, missing {missing}"

    tags = client.get_run(run_id).data.tags
    restored = int(tags["cola_ray.restored_from_step"])
    assert restored % CKPT_EVERY == 0 and restored > 0, tags
    redone = step_at_kill - restored
    # The global step went back to the last complete checkpoint: at most one interval, also
    # when Ray had not registered it yet (cola_ray.train.loop._load_newer).
    assert 0 <= redone <= CKPT_EVERY, (step_at_kill, restored)
    ckpts = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "runs" / "kill-train").glob("checkpoint_0*"))
    assert ckpts == list(range(CKPT_EVERY, max_steps + 1, CKPT_EVERY)), ckpts
    # Exactly-once epochs: the epoch the kill interrupted went on with exactly its remaining
    # clips, so every epoch ended where an uninterrupted run's does (8 steps of 16 pairs),
    # with all 128 clips, none twice. (Starting the epoch over, as before, ended it 4 steps
    # late with 64 repeats.)
    ends = epoch_tallies(client, run_id)
    assert sorted(ends) == list(range(8, max_steps + 1, 8)), ends
    assert all(ends[s] == (128, 0) for s in ends), ends
    first_new = min(m.timestamp for m in history if m.step == step_at_kill + 1) / 1000
    print(f"\nworker kill: killed rank 0 at step {step_at_kill}; Ray Train handed back step "
          f"{tags['cola_ray.ray_checkpoint_step']}, restored from {restored} "
          f"(redone {redone} steps); back past the kill point {first_new - killed_at:.1f}s after the kill; "
          f"run {took:.0f}s; duplicated {len(duplicated)}, missing {len(missing)}")


# ---- row 10: a Ray Data decode worker SIGKILLed while decoding --------------------------------

def test_data_worker_killed_training_continues(ray_local, corpus, tmp_path):
    epochs, clips = 3, 128
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path, corpus, uri, "name=kill-data", f"train.epochs={epochs}", "train.max_steps=0",
               "train.max_failures=0")  # any training failure would fail the run: no hidden restart
    run = Background(cfg)

    def decoding():
        return [p for p in my_descendants() if "decode_and_crop" in cmdline(p)]

    killed = []
    deadline = time.monotonic() + 90
    while run.alive and time.monotonic() < deadline and len(killed) < 2:
        for pid in decoding():
            if pid not in killed:
                try:
                    kill(pid)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
                break
        time.sleep(0.02)
    result = run.join(240)
    assert killed, "never caught a decode task running"
    client = MlflowClient(uri)
    steps = sorted(loss_steps(client, result.mlflow_run_id))
    assert steps == list(range(1, steps[-1] + 1)) and result.metrics["epoch"] == epochs
    good = client.get_run(result.mlflow_run_id).data.metrics["data/good_samples"]
    print(f"\ndata worker kill: killed {len(killed)} decode workers; {steps[-1]} steps over {epochs} epochs; "
          f"good samples counted {good:.0f} for {epochs * clips} decoded once each")
    # A task killed after it reported its shard's tally (just before returning) is counted
    # again when Ray Data retries it: at most one shard (16 clips) per kill.
    assert epochs * clips <= good <= epochs * clips + 16 * len(killed)


# ---- row 11: one rank's data stream blocks for real --------------------------------------------

def test_stalled_data_stream_fails_fast_naming_the_rank(ray_local, corpus, tmp_path):
    stalled = tmp_path / "stalled-shards"
    stalled.mkdir()
    for tar in sorted(corpus.glob("*.tar")):
        os.link(tar, stalled / tar.name)  # no manifest: every *.tar here is a shard
    fifo = stalled / "shard-zz-stalled.tar"
    os.mkfifo(fifo)  # opening it for reading blocks until someone writes: nobody does
    timeout_s = 12.0  # well above a slow epoch start here (a few seconds), short for CI
    cfg = tiny(tmp_path, stalled, f"sqlite:///{tmp_path / 'mlflow.db'}", "name=stall",
               f"train.step_timeout_s={timeout_s}", "train.max_failures=0", "train.max_steps=200",
               "data.shuffle_shards=false", "data.shuffle_buffer=0")  # batches flow until the pipe's turn
    t0 = time.monotonic()
    try:
        with pytest.raises(Exception) as err:
            fit(cfg, echo=lambda *_: None)
        failed_at = time.time()
        took = time.monotonic() - t0
    finally:
        try:  # let the blocked read end (EOF): the decode task finishes instead of hanging on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    message = str(err.value)
    assert "no batch from its data stream" in message and f"train.step_timeout_s={timeout_s:g}" in message, message
    assert any(f"rank {r} of 2" in message for r in range(2)), message
    waited = float(re.search(r"no batch from its data stream for (\d+)s", message).group(1))
    # Training ran before the stall: the watchdog caught the blocked shard, not a slow start.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run_id_of(client, "stall"), "loss")
    assert history, "no step before the stall"
    last_step = max(m.timestamp for m in history) / 1000
    print(f"\nstall: watchdog {timeout_s:.0f}s; {len(history)} steps, then the rank waited {waited:.0f}s; "
          f"fit raised {failed_at - last_step:.0f}s after the last step ({took:.0f}s in all)")
    assert failed_at - last_step < timeout_s + 30
    assert timeout_s <= waited < timeout_s + 5
    assert took < timeout_s + 90


# ---- row 15: the MLflow server stopped mid-run, started again ---------------------------------

def start_server(root: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over ``root/mlflow.db``: stopped and started again
    at the same address, as a restarted tracking server is."""
    return start_mlflow_server(root, str(root / "artifacts"), port=port)[0]


def test_mlflow_down_mid_run_never_blocks_and_loses_no_step(ray_local, corpus, tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    max_steps, down_at, down_for_s, every = 160, 10, 20.0, 40
    cfg = tiny(tmp_path, corpus, uri, "name=mlflow-down", f"train.max_steps={max_steps}",
               "tracking.log_checkpoints=true", f"train.checkpoint_every_steps={every}")
    spool_dir = tmp_path / "runs" / "mlflow-down" / "mlflow_spool"
    try:
        client = MlflowClient(uri)
        run = Background(cfg)
        run_id = wait_for(lambda: run_id_of(client, "mlflow-down"), 60, "the MLflow run", run)
        wait_for(lambda: max(loss_steps(client, run_id), default=0) >= down_at, 120, f"step {down_at}", run)
        stop_process_group(server)  # the real server process, by PID
        down = time.time()

        def spooled_step() -> int:
            return max(spooled_steps(spool_dir / f"{run_id}.jsonl"), default=0)

        # MLflow lags rank 0 by a few steps: count from the step rank 0 had logged at the stop.
        step_down = max(down_at, spooled_step())
        wait_for(lambda: time.time() - down >= down_for_s and spooled_step() >= step_down + 10
                 or spooled_step() >= max_steps - 10, 120, "the server down a while", run)
        server = start_server(root, port)  # same port, same store
        up = time.time()
        result = run.join(180)

        history = client.get_metric_history(run_id, "loss")
        counts = collections.Counter(m.step for m in history)
        duplicated = sorted(s for s, n in counts.items() if n > 1)
        missing = sorted(set(range(1, max_steps + 1)) - set(counts))
        assert not duplicated and not missing, f"duplicated {duplicated}, missing {missing}"
        # Timestamps are taken when rank 0 logs a step, so their gaps are step times.
        stamps = np.array(sorted(m.timestamp for m in history)) / 1000.0
        gaps = np.diff(stamps)
        during = [g for t, g in zip(stamps[1:], gaps) if down <= t <= up]
        before = [g for t, g in zip(stamps[1:], gaps) if t < down]
        spooled = sum(1 for t in stamps if down <= t <= up)
        print(f"\nmlflow down: {up - down:.0f}s down, {spooled} steps logged meanwhile (spooled, delivered "
              f"after); step time median {np.median(before):.2f}s before, max {max(during):.2f}s while down; "
              f"duplicated {len(duplicated)}, missing {len(missing)}")
        assert spooled >= 5
        assert max(during) < 5.0, during
        assert not (spool_dir / f"{run_id}.jsonl").exists(), "spool emptied once delivered"
        arts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
        assert {f"checkpoints/checkpoint_{s:09d}" for s in range(every, max_steps + 1, every)} <= arts, arts
        assert client.get_run(run_id).info.status == "FINISHED" and result.checkpoint
    finally:
        stop_process_group(server)


def test_spool_left_by_a_dead_server_is_replayed_once(tmp_path):
    """No Ray: the logger against a stopped server, then ``cola-ray replay-metrics``."""
    from cola_ray.train.tracking import SpooledLogger

    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(root, port)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("replay")).info.run_id
        logger = SpooledLogger(uri, run_id, tmp_path / "spool", retry_s=0.5)
        logger.log_metrics({"loss": 1.0}, step=1)
        wait_for(lambda: loss_steps(client, run_id) == [1], 30, "step 1 delivered")
        stop_process_group(server)
        t0 = time.monotonic()
        for step in range(2, 8):
            logger.log_metrics({"loss": float(step)}, step=step)
        assert time.monotonic() - t0 < 0.5, "logging must not wait for the server"
        left = logger.close(timeout=3)
        assert left == 6
        # A request in flight when close() gave up may still be inside urllib3's retries
        # (~15 s of back-off): it must end before the server returns, or it delivers the batch
        # itself and the replay below rightly finds every point already in the run.
        logger._thread.join(60)
        assert not logger._thread.is_alive(), "the delivery thread must stop after close()"
        spool = tmp_path / "spool" / f"{run_id}.jsonl"
        assert spool.is_file()
        server = start_server(root, port)
        client.log_metric(run_id, "loss", 2.0, step=2)  # already there: must not come twice
        out = subprocess.run([str(BIN / "cola-ray"), "replay-metrics", str(spool), "--tracking-uri", uri],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "delivered 5 metric points; 1 were already in the run" in out.stdout, out.stdout
        assert sorted(loss_steps(client, run_id)) == list(range(1, 8))
        assert not spool.exists()
    finally:
        stop_process_group(server)


# ---- row 19: resuming with another number of workers -----------------------------------------

def test_resume_with_other_world_size_keeps_global_batch(ray_local, corpus, tmp_path):
    from cola_ray.train.checkpoint import read_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = fit(tiny(tmp_path, corpus, uri, "name=ws", "train.max_steps=20"), echo=lambda *_: None)
    again = fit(tiny(tmp_path, corpus, uri, "name=ws", "train.max_steps=30", "train.num_workers=1",
                     "train.cpus_per_worker=1"), echo=lambda *_: None)
    assert again.resumed and again.mlflow_run_id == first.mlflow_run_id
    history = sorted(MlflowClient(uri).get_metric_history(first.mlflow_run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 31))
    loss = np.array([m.value for m in history])
    before, after = loss[15:20].mean(), loss[20:25].mean()
    print(f"\nworld size 2 -> 1 at step 20 (global batch 16: 8 -> 16 per worker): mean loss steps 16-20 "
          f"{before:.3f}, steps 21-25 {after:.3f}; chance {np.log(16):.3f}")
    # The trained weights go on (bit-for-bit restores: tests/train/test_resume_state.py): the loss
    # stays far below chance, where a fresh start is. It need not equal the loss before: train-mode
    # batch norm now normalises over 16 pairs instead of 8 (measured: -0.35 and +0.63 nats).
    assert after < np.log(16) - 0.5 and before < np.log(16) - 0.5, (before, after)
    state = read_state(again.checkpoint)
    assert (state.step, state.world_size, state.global_batch) == (30, 1, 16)
    # Step 20 was mid-epoch (epoch 2: steps 17-24); one worker went on with exactly the 64
    # clips two workers had not trained on: the epoch still ends at step 24, every clip once.
    assert epoch_tallies(MlflowClient(uri), first.mlflow_run_id) == {8: (128, 0), 16: (128, 0), 24: (128, 0)}


def test_resume_that_would_change_the_negatives_is_refused(ray_local, corpus, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Without gathering, the negatives are the per-worker batch: another world size would
    # change the objective, so it is refused, naming both settings.
    fit(tiny(tmp_path, corpus, uri, "name=ws-local", "train.max_steps=2", "model.gather_negatives=false"),
        echo=lambda *_: None)
    with pytest.raises(ConfigError, match="pairs per softmax") as err:  # on the driver, before workers start
        fit(tiny(tmp_path, corpus, uri, "name=ws-local", "train.max_steps=4", "train.num_workers=1",
                 "model.gather_negatives=false"), echo=lambda *_: None)
    assert "8 pairs per softmax" in str(err.value) and "this run would use 16" in str(err.value)
