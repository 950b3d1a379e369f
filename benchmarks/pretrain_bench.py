"""Pre-training throughput: Ray Data vs a single process, Ray Train vs a bare PyTorch loop.

One run, the same FLAC shards, printed side by side as ratios against a baseline
measured in the same run (speed is never asserted in tests; this machine is shared and
noisy, so every measurement is repeated in interleaved rounds and medians are reported)::

    .venv/bin/python benchmarks/pretrain_bench.py            # ~4-8 min on 2 CPU cores
    .venv/bin/python benchmarks/pretrain_bench.py --quick    # ~2 min, one round

What is measured
----------------
Pipeline (pairs of waveform crops per second):

- baseline: one process calls ``pipeline.decode_and_crop`` shard after shard and stacks
  batches of 64 pairs (what a consumer needs), ``--passes`` passes over the shards;
- Ray Data, ``read_pairs(DataConfig(decode_num_cpus=1, decode_concurrency=C))`` consumed
  with ``iter_batches(batch_size=64)`` on a local Ray with 2 CPUs, C = 1 and 2:
  "steady": one execution over the shard list repeated ``--passes`` times;
  "per epoch": ``--passes`` fresh executions over the shard list (what training does
  every epoch: Ray Data restarts the pipeline), with the time to the first batch.
  Per-core rates divide by C; "pairs per CPU-s" divides by the CPU time that the whole
  process tree (driver, raylet, GCS, Ray workers) consumed, read from /proc.
  Two diagnostic rows: C=2 with Ray Data's ``op_resource_reservation_enabled`` off, and
  C=1 per epoch with ``shuffle_shards=false`` (no ``random_shuffle`` stage).

Training (optimiser steps per second at a fixed global batch):

- baseline: a bare PyTorch loop (``ColaModel``, Adam) over one fixed in-memory batch of
  real decoded pairs, ``torch.set_num_threads(1)`` = what one Ray Train worker with
  ``cpus_per_worker <= 1`` gets; also at half the batch (one worker's share of a
  2-worker run: x2 is the ideal 2-worker rate);
- Ray Train: ``trainer.fit(cfg)`` on the shards with 1 worker x 1 CPU and 2 workers x
  0.5 CPU, ``max_steps`` steps, ``log_every_steps=1``, MLflow in a temporary sqlite
  store. The per-step ``pairs_per_second`` and ``data_wait_fraction`` metrics are read
  back from MLflow, the first ``--warmup`` steps skipped. "median step" is the median of
  those in-loop rates (they exclude the per-step logging); "wall" is steps per second
  from the MLflow timestamps of the logged steps (includes logging, Ray Data's restart
  at every epoch and data waits). Data wait is shown as the median and time-weighted.

Before every round two spinning processes probe how many cores the run can get (other
jobs share this machine); the tables go to stdout at the end, Ray's own logs to stderr.
A ``trainer.fit`` that fails is retried once and counted: where several Ray clusters
share this machine, Ray Train V2's PlacementGroupCleaner (no address given) auto-detects
the most recently started local cluster, asks *its* State API for this run's controller,
does not find it, takes it for dead and removes the run's placement group.

Only ``benchmarks/`` is touched; everything else is cola_ray's public code.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

# ---- small helpers --------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_stat(path: str) -> tuple[str, int, float] | None:
    """(comm, ppid, user+system CPU seconds) from /proc/<pid>[/task/<tid>]/stat; None if gone."""
    try:
        with open(path) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
    return stat[stat.find("(") + 1: stat.rfind(")")], int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_processes(root_pid: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (comm, CPU seconds) of ``root_pid`` (default: this process) and all descendants.

    Read from /proc so it needs no psutil. Processes that exit between two readings lose
    their time; Ray's workers are long-lived, so the error is small.
    """
    root_pid = root_pid or os.getpid()
    parent: dict[int, int] = {}
    info: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (got := proc_stat(f"/proc/{entry}/stat")):
            parent[int(entry)], info[int(entry)] = got[1], (got[0], got[2])
    out = {}
    for pid, comm_cpu in info.items():
        p, hops = pid, 0
        while p and p != root_pid and hops < 64:
            p, hops = parent.get(p, 0), hops + 1
        if p == root_pid:
            out[pid] = comm_cpu
    return out


def tree_cpu_seconds(root_pid: int | None = None) -> float:
    """user+system CPU seconds of ``root_pid`` (default: this process) and all descendants."""
    return sum(cpu for _, cpu in tree_processes(root_pid).values())


def blas_threads(n: int) -> Any:
    """Limit numpy's BLAS threads (OpenBLAS spins a second thread on a 160k-sample dot)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the baseline may use 2 BLAS threads
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def probe_cores(seconds: float = 0.5) -> float:
    """Cores this run can get right now: CPU time two spinning processes obtain / wall."""
    import subprocess

    code = ("import time\nc=time.process_time()\nt=time.perf_counter()\n"
            "while time.perf_counter()-t<%f: pass\nprint(time.process_time()-c)" % seconds)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    cpu = 0.0
    for p in procs:
        out, _ = p.communicate(timeout=60)
        cpu += float(out.strip() or 0)
    return cpu / seconds


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print()
    print(title)
    print(line)
    print("  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print(line)
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(line, flush=True)


# ---- data -----------------------------------------------------------------------------

def make_shards(workdir: Path, n_clips: int, seconds: float, per_shard: int) -> Path:
    """Synthetic clips -> FLAC WebDataset shards (reused when a complete build is there)."""
    from cola_ray.data import shards, synthetic

    out = workdir / f"shards-{n_clips}x{seconds:g}s-{per_shard}"
    manifest = out / shards.MANIFEST
    if manifest.is_file():
        try:
            if shards.read_manifest(str(out)).get("complete"):
                return out
        except Exception:
            pass
    with tempfile.TemporaryDirectory(prefix="bench-clips-", dir=workdir) as clips:
        labels = synthetic.make_corpus(clips, n_clips=n_clips, seconds=seconds, seed=0)
        shards.build_shards(clips, out, labels_csv=labels, max_samples=per_shard, progress=False)
    return out


# ---- pipeline -------------------------------------------------------------------------

BATCH_ROWS = 64


def single_process_pass(urls: list[str], cfg: dict[str, Any], passes: int) -> dict[str, float]:
    """decode_and_crop over every shard, ``passes`` times, in this process; batches of 64."""
    from cola_ray.data import pipeline

    with blas_threads(1):  # one core, as a Ray task with num_cpus=1 gets (OMP_NUM_THREADS=1)
        return _single_process_pass(pipeline, urls, cfg, passes)


def _single_process_pass(pipeline: Any, urls: list[str], cfg: dict[str, Any], passes: int) -> dict[str, float]:
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    n = 0
    anchors: list[np.ndarray] = []
    positives: list[np.ndarray] = []
    for _ in range(passes):
        for url in urls:
            for row in pipeline.decode_and_crop({"shard": url}, cfg=cfg):
                anchors.append(row["anchor"])
                positives.append(row["positive"])
                if len(anchors) == BATCH_ROWS:
                    batch = {"anchor": np.stack(anchors), "positive": np.stack(positives)}
                    n += batch["anchor"].shape[0]
                    anchors, positives = [], []
    if anchors:
        n += np.stack(anchors).shape[0]
        np.stack(positives)
    dt = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - cpu0
    return {"pairs": n, "seconds": dt, "pairs_s": n / dt, "cpu_s": cpu, "pairs_per_cpu_s": n / max(cpu, 1e-9)}


def ray_data_run(shard_dir: Path, urls: list[str], concurrency: int, passes: int, steady: bool,
                 shuffle: bool = True, reservation: bool = True) -> dict[str, float]:
    """read_pairs consumed with iter_batches(64): one execution over urls*passes (steady)
    or ``passes`` executions over urls (per epoch).

    ``shuffle=False``: data.shuffle_shards=false (no random_shuffle stage);
    ``reservation=False``: Ray Data's DataContext.op_resource_reservation_enabled=False.
    """
    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import read_pairs

    data = DataConfig(shards=str(shard_dir), decode_num_cpus=1.0, decode_concurrency=concurrency,
                      shuffle_shards=shuffle)
    executions = [urls * passes] if steady else [urls] * passes
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = reservation
    try:
        return _ray_data_run(read_pairs, data, executions)
    finally:
        ctx.op_resource_reservation_enabled = saved


def _ray_data_run(read_pairs: Any, data: Any, executions: list[list[str]]) -> dict[str, float]:
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    n, first = 0, []
    for run_urls in executions:
        ds = read_pairs(data, urls=run_urls)
        t_start = time.perf_counter()
        got_first = False
        for batch in ds.iter_batches(batch_size=BATCH_ROWS, batch_format="numpy"):
            if not got_first:
                first.append(time.perf_counter() - t_start)
                got_first = True
            n += len(batch["anchor"])
    dt = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - cpu0
    return {"pairs": n, "seconds": dt, "pairs_s": n / dt, "cpu_s": cpu,
            "pairs_per_cpu_s": n / max(cpu, 1e-9), "first_batch_s": med(first)}


# ---- training -------------------------------------------------------------------------

def model_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.encoder={args.encoder}", "model.drop_path_rate=0.0", f"model.proj_dim={args.proj_dim}",
    ]


def bare_loop(args: argparse.Namespace, pairs: tuple[np.ndarray, np.ndarray], batch: int) -> dict[str, float]:
    """ColaModel + Adam over one fixed in-memory batch, 1 torch thread, ``args.steps`` steps."""
    import torch

    from cola_ray.config import load_config
    from cola_ray.model.cola import ColaModel

    cfg = load_config(None, model_overrides(args))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one Ray Train worker with cpus_per_worker <= 1 gets
    try:
        torch.manual_seed(0)
        model = ColaModel(cfg.features, cfg.model)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        anchor = torch.from_numpy(pairs[0][:batch]).float().contiguous()
        positive = torch.from_numpy(pairs[1][:batch]).float().contiguous()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            out = model(anchor, positive)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            out["loss"].item()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    kept = times[args.warmup:]
    step = med(kept)
    return {"steps_s": 1 / step, "pairs_s": batch / step, "wall_steps_s": len(kept) / sum(kept)}


def ray_train_run(args: argparse.Namespace, shard_dir: Path, workdir: Path, workers: int, name: str) -> dict[str, float]:
    """trainer.fit with ``workers`` x 1/workers CPU; per-step metrics read back from MLflow."""
    from mlflow.tracking import MlflowClient

    from cola_ray.config import load_config
    from cola_ray.train.trainer import fit

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(None, [
        f"data.shards={shard_dir}", f"data.shuffle_buffer={args.shuffle_buffer}", "data.decode_num_cpus=1.0",
        *model_overrides(args),
        f"train.batch_size={args.batch}", f"train.num_workers={workers}",
        f"train.cpus_per_worker={1.0 / workers}", f"train.max_steps={args.steps}", "train.lr=0.001",
        "train.log_every_steps=1", "train.checkpoint_every_steps=1000000", "train.max_failures=0",
        f"storage_path={workdir / 'runs'}", f"name={name}",
        f"tracking.tracking_uri={uri}", "tracking.experiment=pretrain-bench",
        "tracking.log_checkpoints=false", "tracking.log_model=false",
    ])
    retries = 0
    while True:
        t0 = time.perf_counter()
        try:
            result = fit(cfg, echo=lambda *_: None)
            break
        except Exception as e:  # noqa: BLE001 - one retry, reported; a second failure propagates
            # Seen on this shared machine: Ray Train V2's PlacementGroupCleaner queries another
            # local cluster's State API, takes the controller for dead and removes the run's
            # placement group ("Destroying worker since its placement group was removed").
            if retries >= 1:
                raise
            retries += 1
            log(f"trainer.fit failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); retrying once")
            cfg.name = f"{name}-retry{retries}"
    fit_wall = time.perf_counter() - t0
    client = MlflowClient(uri)

    def history(key: str) -> dict[int, Any]:
        return {m.step: m for m in client.get_metric_history(result.mlflow_run_id, key)}

    pps, wait, epoch = history("pairs_per_second"), history("data_wait_fraction"), history("epoch")
    steps = sorted(s for s in pps if s > args.warmup)
    rates = [pps[s].value for s in steps]
    totals = [args.batch / max(pps[s].value, 1e-9) for s in steps]  # seconds per step, in-loop
    waits = [wait[s].value for s in steps]
    # Wall rate from MLflow timestamps (ms): logged right after each step.
    first, last = args.warmup, steps[-1]
    wall = (pps[last].timestamp - pps[first].timestamp) / 1000 if first in pps else float("nan")
    n_epochs = len({epoch[s].value for s in steps})
    # Steps that open an epoch wait for Ray Data to start a fresh execution of the dataset.
    opening = [s for s in steps if s - 1 in epoch and epoch[s].value != epoch[s - 1].value]
    inner = [s for s in steps if s - 1 in pps and s not in opening]
    epoch_start_wait = [wait[s].value * args.batch / max(pps[s].value, 1e-9) for s in opening]
    # Time between two logged steps that the in-loop timer does not see: logging to MLflow,
    # the sample counter snapshot (an actor call) and the metric all-reduces.
    outside_ms = [(pps[s].timestamp - pps[s - 1].timestamp) - 1000 * args.batch / max(pps[s].value, 1e-9)
                  for s in inner]
    return {
        "epoch_start_wait_s": med(epoch_start_wait),
        "log_ms": med(outside_ms),
        "steps_s": med(rates) / args.batch,
        "pairs_s": med(rates),
        "wall_steps_s": (last - first) / wall if wall > 0 else float("nan"),
        "wait_median": med(waits),
        "wait_weighted": sum(w * t for w, t in zip(waits, totals)) / sum(totals),
        "fit_wall_s": fit_wall,
        "outside_steps_s": fit_wall - wall,  # Ray/Train start, first `warmup` steps, teardown
        "epochs": n_epochs,
        "retries": retries,
    }


# ---- main -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, fewer steps and clips (~2 min)")
    p.add_argument("--workdir", type=Path, default=None, help="keep corpus, runs and MLflow db here")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--clips", type=int, default=None, help="10 s clips in the corpus (default 160, quick 120)")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (AudioSet: 10 s)")
    p.add_argument("--per-shard", type=int, default=20, help="clips per shard")
    p.add_argument("--passes", type=int, default=None, help="passes over the shards per pipeline measurement")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 50, quick 25)")
    p.add_argument("--warmup", type=int, default=5, help="training steps skipped at the start of a run")
    p.add_argument("--batch", type=int, default=32, help="global batch (pairs per step)")
    p.add_argument("--encoder", default="test_efficientnet", help="timm encoder (tiny by default)")
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=64, help="data.shuffle_buffer of the Ray Train runs")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.clips = args.clips or (120 if args.quick else 160)
    args.passes = args.passes or (3 if args.quick else 5)
    args.steps = args.steps or (25 if args.quick else 50)
    if args.steps <= args.warmup + 2:
        p.error("--steps must exceed --warmup by at least 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    t_all = time.perf_counter()

    own_tmp = None
    if args.workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="cola-bench-")
        workdir = Path(own_tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)

    import ray

    try:
        log(f"corpus: {args.clips} clips x {args.seconds:g} s -> FLAC shards of {args.per_shard} under {workdir}")
        t = time.perf_counter()
        shard_dir = make_shards(workdir, args.clips, args.seconds, args.per_shard)
        log(f"shards ready in {time.perf_counter() - t:.1f} s")

        from cola_ray.data import pipeline
        from cola_ray.config import DataConfig

        urls = pipeline.list_shards(DataConfig(shards=str(shard_dir)))
        data_cfg = dataclasses.asdict(DataConfig(shards=str(shard_dir)))
        pairs_list = list(pipeline.decode_and_crop({"shard": urls[0]}, cfg=data_cfg))
        for url in urls[1:]:
            if len(pairs_list) >= args.batch:
                break
            pairs_list += list(pipeline.decode_and_crop({"shard": url}, cfg=data_cfg))
        fixed_pairs = (np.stack([r["anchor"] for r in pairs_list]), np.stack([r["positive"] for r in pairs_list]))
        if fixed_pairs[0].shape[0] < args.batch:
            raise SystemExit(f"need at least {args.batch} clips for one batch")

        log("starting a local Ray with num_cpus=2")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)

        pipe: dict[str, list[dict[str, float]]] = {}
        train: dict[str, list[dict[str, float]]] = {}
        cores: list[float] = []

        def probe(where: str) -> None:
            cores.append(probe_cores())
            log(f"{where}: load average {loadavg()}, cores available to 2 spinning processes {cores[-1]:.2f}")

        if not args.skip_pipeline:
            log("pipeline warm-up (Ray workers import cola_ray once)")
            for c in (1, 2):
                ray_data_run(shard_dir, urls, c, 1, steady=True)
            cases: list[tuple[str, Callable[[], dict[str, float]]]] = [
                ("single", lambda: single_process_pass(urls, data_cfg, args.passes)),
                ("ray1_steady", lambda: ray_data_run(shard_dir, urls, 1, args.passes, steady=True)),
                ("ray2_steady", lambda: ray_data_run(shard_dir, urls, 2, args.passes, steady=True)),
                ("ray1_epoch", lambda: ray_data_run(shard_dir, urls, 1, args.passes, steady=False)),
                ("ray2_epoch", lambda: ray_data_run(shard_dir, urls, 2, args.passes, steady=False)),
                ("ray2_noreserve", lambda: ray_data_run(shard_dir, urls, 2, args.passes, steady=True,
                                                        reservation=False)),
                ("ray1_noshuffle", lambda: ray_data_run(shard_dir, urls, 1, args.passes, steady=False,
                                                        shuffle=False)),
            ]
            for r in range(args.rounds):
                probe(f"pipeline round {r + 1}")
                order = cases[r % len(cases):] + cases[: r % len(cases)]  # rotate: no fixed position
                for key, fn in order:
                    res = fn()
                    pipe.setdefault(key, []).append(res)
                    log(f"pipeline round {r + 1}/{args.rounds} {key:12s} {res['pairs_s']:7.1f} pairs/s "
                        f"({res['pairs']} pairs in {res['seconds']:.2f} s, {res['cpu_s']:.2f} CPU-s)")

        if not args.skip_training:
            half = args.batch // 2
            tcases: list[tuple[str, Callable[[int], dict[str, float]]]] = [
                ("bare", lambda r: bare_loop(args, fixed_pairs, args.batch)),
                ("bare_half", lambda r: bare_loop(args, fixed_pairs, half)),
                ("ray_1w", lambda r: ray_train_run(args, shard_dir, workdir, 1, f"bench-1w-r{r}-{os.getpid()}")),
                ("ray_2w", lambda r: ray_train_run(args, shard_dir, workdir, 2, f"bench-2w-r{r}-{os.getpid()}")),
            ]
            for r in range(args.rounds):
                probe(f"training round {r + 1}")
                order = tcases[r % len(tcases):] + tcases[: r % len(tcases)]
                for key, fn in order:
                    res = fn(r)
                    train.setdefault(key, []).append(res)
                    extra = (f", wall {res['wall_steps_s']:.2f} steps/s, data wait med {res['wait_median']:.2f} "
                             f"weighted {res['wait_weighted']:.2f}, epoch-start wait {res['epoch_start_wait_s']:.2f} s, "
                             f"outside-timer {res['log_ms']:.0f} ms/step, fit {res['fit_wall_s']:.1f} s"
                             if key.startswith("ray") else "")
                    log(f"training round {r + 1}/{args.rounds} {key:9s} {res['steps_s']:6.2f} steps/s "
                        f"{res['pairs_s']:7.1f} pairs/s{extra}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if own_tmp is not None:
            own_tmp.cleanup()

    # ---- report ---------------------------------------------------------------------
    def m(rows: list[dict[str, float]], key: str) -> float:
        return med([x[key] for x in rows])

    print()
    print(f"command: {command}")
    print(f"machine: {os.cpu_count()} CPU cores, local Ray num_cpus=2; {args.rounds} interleaved round(s), "
          f"medians (spread = min-max over rounds)")
    if cores:
        print(f"load   : cores two spinning processes got at each round start: "
              f"{', '.join(f'{c:.2f}' for c in cores)} (2.00 = machine to ourselves); load average at end {loadavg()}")
    print(f"shards : {args.clips} synthetic clips x {args.seconds:g} s, 16 kHz FLAC, {args.per_shard} per shard "
          f"({len(urls)} shards); one pair (2 x 15600 samples) per clip")

    if pipe:
        base = m(pipe["single"], "pairs_s")
        base_cpu = m(pipe["single"], "pairs_per_cpu_s")
        def pipe_row(label: str, rs: list[dict[str, float]], c: int) -> list[str]:
            rate = m(rs, "pairs_s")
            per_cpu = m(rs, "pairs_per_cpu_s")
            return [label, f"{rate:.1f}", spread([x["pairs_s"] for x in rs]), f"{rate / c:.1f}", f"{per_cpu:.1f}",
                    f"{rate / c / base:.2f}", f"{per_cpu / base_cpu:.2f}", f"{m(rs, 'first_batch_s'):.2f}"]

        rows = [[
            "single process decode_and_crop [baseline]", f"{base:.1f}", spread([x["pairs_s"] for x in pipe["single"]]),
            f"{base:.1f}", f"{base_cpu:.1f}", "1.00", "1.00", "-",
        ]]
        for c in (1, 2):
            for mode, label in (("steady", f"steady, 1 run of {args.passes} x shards"),
                                ("epoch", f"per epoch, {args.passes} runs of 1 x shards")):
                rs = pipe[f"ray{c}_{mode}"]
                rows.append(pipe_row(f"Ray Data concurrency={c}, {label}", rs, c))
        rows.append(pipe_row("  same, concurrency=2, steady, op_resource_reservation off", pipe["ray2_noreserve"], 2))
        rows.append(pipe_row("  same, concurrency=1, per epoch, shuffle_shards=false", pipe["ray1_noshuffle"], 1))
        print_table(
            "PIPELINE: pairs/s (decode 10 s FLAC + crop one pair), batches of 64",
            ["what", "pairs/s", "spread", "pairs/s/core", "pairs/CPU-s", "ratio/core", "ratio/CPU-s", "1st batch s"],
            rows,
        )
        print("  per core = pairs/s / decode tasks allowed at once (concurrency); pairs/CPU-s = pairs per CPU-second "
              "used by the whole process tree (driver + raylet + GCS + Ray workers)")
        print("  1st batch s = median seconds from starting an execution to its first batch of 64 (includes the "
              "randomize_block_order of the shard list, unless shuffle_shards=false)")
        print("  the baseline runs with 1 BLAS thread (a Ray task with num_cpus=1 gets OMP_NUM_THREADS=1)")

    if train:
        base = m(train["bare"], "steps_s")
        base_wall = m(train["bare"], "wall_steps_s")
        half = m(train["bare_half"], "pairs_s")
        rows = [
            [f"bare PyTorch, B={args.batch}, 1 thread [baseline]", f"{base:.2f}", f"{m(train['bare'], 'pairs_s'):.1f}",
             spread([x["steps_s"] for x in train["bare"]], "{:.2f}"), "1.00", f"{base_wall / base:.2f}", "-", "-", "-", "-"],
            [f"bare PyTorch, B={args.batch // 2}, 1 thread (x2 = ideal 2 workers)",
             f"{m(train['bare_half'], 'steps_s'):.2f}", f"{half:.1f}",
             spread([x["steps_s"] for x in train["bare_half"]], "{:.2f}"), "-", "-", "-", "-", "-", "-"],
        ]
        for key, label in (("ray_1w", "Ray Train 1 worker x 1 CPU"), ("ray_2w", "Ray Train 2 workers x 0.5 CPU")):
            rs = train[key]
            rate = m(rs, "steps_s")
            rows.append([
                f"{label}, global B={args.batch}", f"{rate:.2f}", f"{m(rs, 'pairs_s'):.1f}",
                spread([x["steps_s"] for x in rs], "{:.2f}"), f"{rate / base:.2f}",
                f"{m(rs, 'wall_steps_s') / base:.2f}",
                f"{m(rs, 'wait_median'):.2f} / {m(rs, 'wait_weighted'):.2f}",
                f"{m(rs, 'epoch_start_wait_s'):.2f}", f"{m(rs, 'log_ms'):.0f}",
                f"{m(rs, 'fit_wall_s'):.0f} / {m(rs, 'outside_steps_s'):.0f}",
            ])
        print_table(
            f"TRAINING: optimiser steps/s, {args.encoder} (proj {args.proj_dim}), global batch {args.batch}, "
            f"steps {args.warmup + 1}-{args.steps} of {args.steps}",
            ["what", "steps/s", "pairs/s", "spread", "ratio", "wall ratio", "data wait med/wtd",
             "epoch-start wait s", "untimed ms/step", "fit s / outside s"],
            rows,
        )
        retried = sum(x["retries"] for k in ("ray_1w", "ray_2w") for x in train[k])
        if retried:
            print(f"  {retried} trainer.fit run(s) failed and were retried once (see the log above)")
        r2 = train["ray_2w"]
        print(f"  Ray Train 2 workers vs ideal (2 x bare B={args.batch // 2}): "
              f"{m(r2, 'pairs_s') / (2 * half):.2f} (median step), "
              f"{m(r2, 'wall_steps_s') * args.batch / (2 * half):.2f} (wall)")
        epochs = med([x["epochs"] for x in train["ray_1w"]])
        print(f"  ratio = median in-loop step rate / bare median; wall ratio = steps/s from MLflow timestamps "
              f"(per-step MLflow logging, ~{epochs:.0f} epochs, each a Ray Data restart, data waits) / bare median")
        print("  data wait = data_wait_fraction (median step / time-weighted); epoch-start wait = seconds the first "
              "step of an epoch waits for Ray Data's fresh execution (median)")
        print("  untimed ms/step = time between two logged steps outside the loop's timer (MLflow log_batch, sample "
              "counter actor call, metric all-reduces), median")
        print(f"  fit s = trainer.fit wall time; outside s = its part outside steps {args.warmup + 1}-{args.steps} "
              "(Ray Train start, warm-up steps, final checkpoint, teardown)")
    print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
