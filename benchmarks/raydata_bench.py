"""Where Ray Data's CPU goes on the training data path: fixed per execution, per pair, per process.

``pipeline_bench.py`` divides pairs by the CPU of a whole execution, so what Ray Data pays
once per execution (planning, scheduling the first task, the streaming executor's start and
stop) and per wall-second (Ray's idle processes) is spread over the few thousand pairs a
benchmark streams. A training epoch streams millions. This script separates the three::

    .venv/bin/python benchmarks/raydata_bench.py            # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/raydata_bench.py --quick    # ~1 min

For FLAC full decode and the warm node-local cache, on one shard of ``--clips`` 10 s clips:

- the single-process loop (``decode_and_crop_blocks`` in this thread, what a decode task
  runs): CPU per pair;
- ``read_pairs`` + ``iter_batches(64)`` at two lengths, ``P`` and ``4P`` passes of the shard
  list in one execution each (one decode task, ``decode_concurrency=1``): the difference
  gives the *marginal* CPU per pair (what Ray Data costs in steady state), the rest the
  fixed cost of one execution;
- the CPU of every process of the local Ray by role (the driver's consumer thread and its
  other threads, the decode worker, raylet, GCS, other Ray processes), minus what the same
  processes burn idle over the same wall time (measured first, with nothing running); each
  Ray actor (stats, autoscaling, dashboard agent) is its own row, by its process title.

Ratios are pairs per CPU-second of Ray Data over the single loop's: ``all-in`` (the
pipeline_bench figure), ``marginal`` (steady state, a long epoch), and ``marginal, less
idle`` (Ray's background processes counted at their idle rate, a cost of having Ray on the
node at all, paid whether or not data flows).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any


from pipeline_bench import data_cfg, make_big_shard, make_shards, single_run
from pretrain_bench import loadavg, log, med, print_table, proc_stat, tree_processes

def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _role(pid: int, comm: str) -> str:
    cmd = _cmdline(pid)
    if "raylet" in comm or "/raylet" in cmd:
        return "raylet"
    if "gcs_server" in comm or "gcs_server" in cmd:
        return "gcs_server"
    title = cmd.split(" ", 1)[0]
    if title.startswith("ray::"):  # a worker's process title: its task, its actor or IDLE
        if title.startswith(("ray::MapBatches", "ray::IDLE")):
            return "ray::decode task / idle worker"
        # An actor is titled ray::Class.method while a method runs: one role per actor, so
        # its cumulative CPU never moves between rows from one reading to the next.
        return title.split(".", 1)[0]
    return "other Ray processes"


def snapshot() -> dict[str, float]:
    """role -> CPU seconds so far, for this process's threads and every descendant process."""
    me = os.getpid()
    out: dict[str, float] = {}
    main_tid = threading.main_thread().native_id
    for tid in os.listdir(f"/proc/{me}/task"):
        if got := proc_stat(f"/proc/{me}/task/{tid}/stat"):
            role = "driver: consumer (main thread)" if int(tid) == main_tid else "driver: other threads"
            out[role] = out.get(role, 0.0) + got[2]
    for pid, (comm, cpu) in tree_processes(me).items():
        if pid != me:  # this process is counted by thread above
            role = _role(pid, comm)
            out[role] = out.get(role, 0.0) + cpu
    return out


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}


def ray_measure(urls: list[str], passes: int, cache_dir: str) -> dict[str, Any]:
    """One read_pairs execution over ``passes`` x ``urls``: pairs, wall seconds, CPU by role."""
    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import read_pairs

    data = DataConfig(shards=os.path.dirname(urls[0]), decode_num_cpus=1.0, decode_concurrency=1,
                      cache_dir=cache_dir)
    before, t0 = snapshot(), time.perf_counter()
    n = 0
    for batch in read_pairs(data, urls=urls * passes).iter_batches(batch_size=64, batch_format="numpy"):
        n += len(batch["anchor"])
    wall = time.perf_counter() - t0
    return {"pairs": n, "wall": wall, "cpu": diff(snapshot(), before)}


def idle_rates(seconds: float) -> dict[str, float]:
    """role -> cores each role burns with Ray up and nothing running."""
    before, t0 = snapshot(), time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t0
    return {k: v / wall for k, v in diff(snapshot(), before).items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round (~1 min)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the shards here (reused)")
    p.add_argument("--clips", type=int, default=96, help="10 s clips in the base shard")
    p.add_argument("--copies", type=int, default=10, help="the measured shard holds this many copies of the base")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--passes", type=int, default=None,
                   help="short execution's passes over the shard (the long one makes 4x; default 1 full, 4 cache)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


BASE_ROLES = ["driver: consumer (main thread)", "driver: other threads", "ray::decode task / idle worker", "raylet",
              "gcs_server", "other Ray processes"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    own_tmp = tempfile.TemporaryDirectory(prefix="cola-raydata-bench-") if args.workdir is None else None
    workdir = Path(own_tmp.name) if own_tmp else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    import ray

    results: dict[str, list[dict[str, Any]]] = {}  # "<path> short|long" -> Ray Data executions
    singles: dict[str, list[dict[str, float]]] = {}  # path -> single-loop runs
    idle: list[dict[str, float]] = []
    try:
        small = make_shards(workdir, args.clips, 10.0, args.clips)["flac"][0]
        big = make_big_shard(small, workdir / f"flac-big-x{args.copies}", args.copies)
        cache_dir = str(workdir / "cache")
        single_run([big], data_cfg("full", 1, cache_dir), 1)  # fill the cache
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_measure([small], 1, "")  # warm-up: the worker imports cola_ray
        time.sleep(2.0)
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}: load {loadavg()}")
            idle.append(idle_rates(5.0))
            for path, cache, short in (("full", "", args.passes or 1), ("cache-warm", cache_dir, args.passes or 4)):
                cfg = data_cfg("full", 1, cache)
                single = single_run([big], cfg, short)
                singles.setdefault(path, []).append(single)
                for label, passes in (("short", short), ("long", 4 * short)):
                    r = ray_measure([big], passes, cache)
                    results.setdefault(f"{path} {label}", []).append(r)
                    cpu = sum(r["cpu"].values())
                    log(f"{path:10s} {label:5s} {r['pairs']:6d} pairs {r['wall']:6.2f} s wall {cpu:6.2f} CPU-s; "
                        f"single {single['per_cpu_s']:.0f} /CPU-s")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if own_tmp is not None:
            own_tmp.cleanup()

    seen = {k for runs in results.values() for r in runs for k in r["cpu"]}
    ROLES = BASE_ROLES + sorted((seen | {k for d in idle for k in d}) - set(BASE_ROLES))
    idle_med = {k: med([d.get(k, 0.0) for d in idle]) for k in ROLES}
    print()
    print(f"command: {command}")
    print(f"machine: {os.cpu_count()} CPU cores (shared), load at end {loadavg()}; {args.rounds} round(s), medians; "
          f"one FLAC shard of {args.clips * args.copies} 10 s clips, one decode task, iter_batches(64)")
    print_table("IDLE: cores Ray's processes burn with nothing running (5 s)", ["role", "cores"],
                [[k, f"{idle_med[k]:.4f}"] for k in ROLES] + [["all", f"{sum(idle_med.values()):.4f}"]])
    for path in ("full", "cache-warm"):
        single_ms = 1000 * med([1 / r["per_cpu_s"] for r in singles[path]])
        rows, totals = [], {}
        for label in ("short", "long"):
            runs = results[f"{path} {label}"]
            totals[label] = {"pairs": med([r["pairs"] for r in runs]), "wall": med([r["wall"] for r in runs]),
                             **{k: med([r["cpu"].get(k, 0.0) for r in runs]) for k in ROLES}}
        s, l_ = totals["short"], totals["long"]
        d_pairs = l_["pairs"] - s["pairs"]
        d_wall = l_["wall"] - s["wall"]
        for k in ROLES:
            marginal = 1000 * (l_[k] - s[k]) / d_pairs
            idle_part = 1000 * idle_med[k] * d_wall / d_pairs
            fixed = 1000 * (s[k] - (l_[k] - s[k]) / d_pairs * s["pairs"])
            rows.append([k, f"{marginal:.4f}", f"{idle_part:.4f}", f"{marginal - idle_part:.4f}", f"{fixed:.0f}"])
        all_in = 1000 * sum(l_[k] for k in ROLES) / l_["pairs"]
        marginal = 1000 * sum(l_[k] - s[k] for k in ROLES) / d_pairs
        idle_all = 1000 * sum(idle_med.values()) * d_wall / d_pairs
        fixed = 1000 * sum(s[k] for k in ROLES) - marginal * s["pairs"]
        rows.append(["all", f"{marginal:.4f}", f"{idle_all:.4f}", f"{marginal - idle_all:.4f}", f"{fixed:.0f}"])
        print_table(f"FLAC {path}: CPU ms per pair by role (long - short execution), fixed ms per execution",
                    ["role", "marginal ms/pair", "of which idle rate", "less idle", "fixed ms / execution"], rows)
        print(f"  single loop {single_ms:.4f} ms/pair; Ray Data / single, pairs per CPU-second: "
              f"all-in (long execution, {l_['pairs']:.0f} pairs) {single_ms / all_in:.2f}, "
              f"marginal {single_ms / marginal:.2f}, marginal less idle {single_ms / (marginal - idle_all):.2f}; "
              f"pairs/s wall: long {l_['pairs'] / l_['wall']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
