"""Streaming memory: the pipeline must stream, not materialise, 10x more pairs than the object store holds.

A local Ray with a small object store (``--store-mb``, default 100 MB) streams
``read_pairs`` (FLAC shards, full decode, ``pairs_per_clip=8``, 2 decode tasks at once) to
a consumer that takes batches of 256 pairs and sleeps a little per batch (a training step,
slower than the decoders, so Ray Data's backpressure must hold the producers back). It
does so at two sizes, ``--multiples`` (default 3 and 10) times the object store's
capacity in pair bytes (one pair = 2 x 15600 float32 = 124.8 kB; shards are repeated to
get there), and shows that memory does not grow with the amount streamed::

    .venv/bin/python benchmarks/memory_bench.py            # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/memory_bench.py --quick    # ~1.5 min (multiples 2 and 5)

Sampled every 0.5 s while streaming:

- peak RSS (VmRSS) and peak anonymous RSS (RssAnon: the process's own heap, without the
  shared object store pages it maps) of the Ray worker processes (``ray::`` /
  ``default_worker`` descendants of this driver), the highest single worker and the
  highest sum over workers; and of the driver (the consumer);
- object store use: plasma bytes in use and bytes spilled to disk, read with Ray's
  ``ray._private.internal_api.memory_summary(stats_only=True)`` (what ``ray memory
  --stats-only`` prints; Ray has no public API for it; benchmark only).

Streaming means: plasma use stays under the store size, nothing (or little, from
transient bursts) is spilled, and worker RSS is the same at both sizes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

from pretrain_bench import loadavg, log, make_shards, print_table

PAIR_BYTES = 2 * 15600 * 4


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    name, value = line.split(":")
                    out[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def ray_workers() -> list[int]:
    """PIDs of Ray worker processes descended from this driver."""
    me, parent, cmd = os.getpid(), {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent[int(entry)] = int(stat[stat.rfind(")") + 2:].split()[1])
    out = []
    for pid, line in cmd.items():
        if not (line.startswith("ray::") or "default_worker.py" in line):
            continue
        p, hops = pid, 0
        while p and p != me and hops < 32:
            p, hops = parent.get(p, 0), hops + 1
        if p == me:
            out.append(pid)
    return out


def store_stats() -> dict[str, int]:
    import ray
    from ray._private.internal_api import memory_summary

    # The address: other Ray clusters may run on this machine.
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    used = re.search(r"Plasma memory usage (\d+) MiB", text)
    spilled = re.search(r"Spilled (\d+) MiB", text)
    fallback = re.search(r"Plasma filesystem mmap usage: (\d+) MiB", text)
    return {"used_mib": int(used.group(1)) if used else -1, "spilled_mib": int(spilled.group(1)) if spilled else 0,
            "fallback_mib": int(fallback.group(1)) if fallback else 0}


class Sampler(threading.Thread):
    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.stop_event = every, threading.Event()
        self.peak = {"worker_rss": 0, "worker_anon": 0, "workers_anon_sum": 0, "driver_rss": 0, "driver_anon": 0,
                     "store_used_mib": 0, "spilled_mib": 0, "fallback_mib": 0, "workers": 0}
        self.samples = 0
        self.store_errors = ""

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.every)

    def sample(self) -> None:
        pk = self.peak
        stats = [_status(p) for p in ray_workers()]
        if stats:
            pk["worker_rss"] = max(pk["worker_rss"], max(s.get("VmRSS", 0) for s in stats))
            pk["worker_anon"] = max(pk["worker_anon"], max(s.get("RssAnon", 0) for s in stats))
            pk["workers_anon_sum"] = max(pk["workers_anon_sum"], sum(s.get("RssAnon", 0) for s in stats))
            pk["workers"] = max(pk["workers"], len(stats))
        me = _status(os.getpid())
        pk["driver_rss"] = max(pk["driver_rss"], me.get("VmRSS", 0))
        pk["driver_anon"] = max(pk["driver_anon"], me.get("RssAnon", 0))
        try:
            st = store_stats()
            pk["store_used_mib"] = max(pk["store_used_mib"], st["used_mib"])
            pk["spilled_mib"] = max(pk["spilled_mib"], st["spilled_mib"])
            pk["fallback_mib"] = max(pk["fallback_mib"], st["fallback_mib"])
        except Exception as e:  # the stats call may time out on a loaded machine; skip that sample
            self.store_errors = f"{type(e).__name__}: {e}"[:200]
        self.samples += 1

    def stop(self) -> dict[str, int]:
        self.stop_event.set()
        self.join()
        self.sample()
        return dict(self.peak)


def stream(shard_dir: Path, urls: list[str], multiple: float, store_bytes: int, k: int,
           step_s: float) -> dict[str, float]:
    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import read_pairs

    clips_needed = int(multiple * store_bytes / PAIR_BYTES / k) + 1
    clips_per_pass = CLIPS
    passes = -(-clips_needed // clips_per_pass)
    data = DataConfig(shards=str(shard_dir), pairs_per_clip=k, decode_num_cpus=1.0, decode_concurrency=2)
    sampler = Sampler()
    sampler.start()
    t0, n = time.perf_counter(), 0
    for batch in read_pairs(data, urls=urls * passes).iter_batches(batch_size=256, batch_format="numpy"):
        n += len(batch["anchor"])
        time.sleep(step_s)
    dt = time.perf_counter() - t0
    peak = sampler.stop()
    if sampler.store_errors:
        log(f"object store stats failed at least once: {sampler.store_errors}")
    return {**peak, "pairs": n, "gb": n * PAIR_BYTES / 1e9, "seconds": dt, "samples": sampler.samples}


CLIPS = 16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--store-mb", type=int, default=100, help="object_store_memory of the local Ray (MB)")
    p.add_argument("--multiples", type=float, nargs="+", default=None,
                   help="data streamed, in object-store sizes (default 3 10, quick 2 5)")
    p.add_argument("--k", type=int, default=8, help="pairs_per_clip (more pairs per decode: more bytes per CPU-s)")
    p.add_argument("--step-ms", type=float, default=40.0, help="consumer sleep per batch of 256 pairs")
    args = p.parse_args(argv)
    multiples = args.multiples or ([2.0, 5.0] if args.quick else [3.0, 10.0])
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    t_all = time.perf_counter()
    store_bytes = args.store_mb * 10**6

    import ray

    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="cola-mem-bench-") as tmp:
        try:
            shard_dir = make_shards(Path(tmp), CLIPS, 10.0, CLIPS // 2)
            from cola_ray.data import pipeline
            from cola_ray.config import DataConfig

            urls = pipeline.list_shards(DataConfig(shards=str(shard_dir)))
            log(f"starting a local Ray: num_cpus=2, object_store_memory={args.store_mb} MB")
            ray.init(address="local", num_cpus=2, object_store_memory=store_bytes, include_dashboard=False,
                     log_to_driver=False, runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
            ray.data.DataContext.get_current().enable_progress_bars = False
            stream(shard_dir, urls, 0.3, store_bytes, args.k, 0.0)  # warm-up: workers import cola_ray
            for multiple in multiples:
                res = stream(shard_dir, urls, multiple, store_bytes, args.k, args.step_ms / 1000)
                results.append((multiple, res))
                log(f"x{multiple:g}: {res['gb']:.2f} GB of pairs in {res['seconds']:.1f} s; peaks: worker RSS "
                    f"{res['worker_rss'] / 2**20:.0f} MiB, plasma {res['store_used_mib']} MiB, spilled "
                    f"{res['spilled_mib']} MiB ({res['samples']} samples)")
        finally:
            if ray.is_initialized():
                ray.shutdown()

    for multiple, r in results:
        rows.append([f"{multiple:g} x store = {r['gb']:.2f} GB ({r['pairs']} pairs)", f"{r['seconds']:.0f}",
                     f"{r['worker_rss'] / 2**20:.0f}", f"{r['worker_anon'] / 2**20:.0f}",
                     f"{r['workers_anon_sum'] / 2**20:.0f} ({r['workers']})",
                     f"{r['driver_rss'] / 2**20:.0f} / {r['driver_anon'] / 2**20:.0f}",
                     f"{r['store_used_mib']}", f"{r['spilled_mib']}", f"{r['fallback_mib']}"])
    print()
    print(f"command: {command}")
    print(f"local Ray num_cpus=2, object_store_memory={args.store_mb} MB; FLAC shards of {CLIPS // 2} x 10 s clips "
          f"repeated; pairs_per_clip={args.k}; 2 decode tasks; consumer: batches of 256 + {args.step_ms:g} ms sleep; "
          f"load at end {loadavg()}")
    print_table("MEMORY while streaming (peaks over 0.5 s samples)",
                ["data streamed", "s", "worker RSS MiB", "worker anon MiB", "sum anon MiB (workers)",
                 "driver RSS / anon MiB", "plasma used MiB", "spilled MiB", "fallback MiB"], rows)
    if len(results) >= 2:
        (m0, r0), (m1, r1) = results[0], results[-1]
        print(f"  data x{m1 / m0:.1f}: worker anon RSS x{r1['worker_anon'] / max(r0['worker_anon'], 1):.2f}, "
              f"plasma peak x{r1['store_used_mib'] / max(r0['store_used_mib'], 1):.2f}, "
              f"spilled {r0['spilled_mib']} -> {r1['spilled_mib']} MiB (cumulative since Ray start)")
    print("  anon = RssAnon (private heap); RSS also counts object store pages a worker has mapped (shared)")
    print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
