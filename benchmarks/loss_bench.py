"""The distributed COLA loss: B_local x B_global logits per worker vs a naive B_global^2.

Single process, simulated world size (no process group; say so when quoting the numbers)::

    .venv/bin/python benchmarks/loss_bench.py            # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/loss_bench.py --quick    # ~40 s

For a global batch B_global split over W workers (B_local = B_global / W), projections
P = 512 (the paper's), bilinear similarity:

- gathered (cola_ray): what ONE worker computes, by running the real ``loss.cola_loss``
  with ``distributed.rank`` / ``all_gather_with_grad`` patched to return rank 0 and the
  (B_global, P) positives of all workers: logits (B_local, B_global); forward + backward;
- naive: ``cola_loss`` on the whole global batch in one worker (what every worker does
  when it all-gathers anchors and positives and builds the full matrix): (B_global, B_global).

Time is the median of ``--repeats`` forward + backward passes with 1 torch thread (the
all-gather's communication is not included: it moves B_global x P floats either way).
Peak memory is measured in a fresh subprocess per configuration (glibc returns large
freed blocks to the OS): the highest resident size sampled every ~0.2 ms by a thread
during the timed steps, minus the resident size before them (inputs allocated, one
warm-up step done). A check row shows that the mean of
the W workers' gathered losses equals the naive loss (the two compute the same thing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

from pretrain_bench import med, print_table

P = 512


def inputs(b_global: int, world: int, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    za = torch.randn(b_global, P, generator=g).tanh()
    zp = torch.randn(b_global, P, generator=g).tanh()
    W = torch.randn(P, P, generator=g) * 0.05
    return {"za": za, "zp": zp, "W": W, "b_local": b_global // world}


def gathered_step(x: dict[str, Any], rank: int = 0) -> float:
    """One worker's loss (rank ``rank``), forward + backward; returns the loss."""
    from unittest import mock

    import torch

    from cola_ray.model import distributed, loss

    b = x["b_local"]
    za = x["za"][rank * b:(rank + 1) * b].clone().requires_grad_(True)
    zp_all = x["zp"].clone().requires_grad_(True)
    W = x["W"].clone().requires_grad_(True)
    with mock.patch.object(distributed, "all_gather_with_grad", lambda t: zp_all), \
            mock.patch.object(distributed, "rank", lambda: rank):
        value, _ = loss.cola_loss(za, zp_all[rank * b:(rank + 1) * b], similarity="bilinear", W=W, gather=True)
    value.backward()
    return value.item()


def naive_step(x: dict[str, Any]) -> float:
    from cola_ray.model import loss

    za = x["za"].clone().requires_grad_(True)
    zp = x["zp"].clone().requires_grad_(True)
    W = x["W"].clone().requires_grad_(True)
    value, _ = loss.cola_loss(za, zp, similarity="bilinear", W=W, gather=False)
    value.backward()
    return value.item()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(kind: str, b_global: int, world: int, repeats: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS rise over the steps (sampled every ~0.2 ms by a
    thread; torch ops release the GIL), then the median step time."""
    import threading

    import torch

    torch.set_num_threads(1)
    x = inputs(b_global, world)
    step = gathered_step if kind == "gathered" else naive_step
    step(x)  # warm-up: lazy initialisation is not the loss's memory
    times, peak, stop = [], [0], threading.Event()
    base = _rss_bytes()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(repeats):
        t = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t)
    stop.set()
    sampler.join()
    return {"peak_mib": max(peak[0] - base, 0) / 2**20, "ms": 1000 * med(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--world", type=int, default=8, help="simulated workers")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, b, w, r = args.child
        print(json.dumps(child(kind, int(b), int(w), int(r))))
        return 0
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = [1024, 4096] if args.quick else [1024, 4096, 8192]
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    t_all = time.perf_counter()

    import torch

    torch.set_num_threads(1)
    x = inputs(1024, args.world)
    gathered_mean = sum(gathered_step(x, r) for r in range(args.world)) / args.world
    naive = naive_step(x)

    rows = []
    for b in sizes:
        res = {}
        for kind in ("gathered", "naive"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(b), str(args.world), str(repeats)],
                                 capture_output=True, text=True, timeout=600, check=True)
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"B_global {b:6d} {kind:8s} {res[kind]['ms']:9.1f} ms  peak +{res[kind]['peak_mib']:.0f} MiB",
                  flush=True)
        g, n = res["gathered"], res["naive"]
        bl = b // args.world
        rows.append([f"B_global {b}, W={args.world} (B_local {bl})", f"{bl}x{b} = {bl * b * 4 / 2**20:.1f} MiB",
                     f"{g['ms']:.1f}", f"{g['peak_mib']:.0f}", f"{b}x{b} = {b * b * 4 / 2**20:.1f} MiB",
                     f"{n['ms']:.1f}", f"{n['peak_mib']:.0f}", f"{n['ms'] / max(g['ms'], 1e-9):.1f}",
                     f"{n['peak_mib'] / max(g['peak_mib'], 1e-9):.1f}"])
    print()
    print(f"command: {command}")
    print(f"single process, simulated world size {args.world} (no process group; communication not timed), "
          f"P={P}, bilinear, fp32, 1 torch thread, median of {repeats} forward+backward")
    print_table("LOSS: one worker's forward + backward",
                ["global batch", "gathered logits", "ms", "peak MiB", "naive logits", "ms", "peak MiB",
                 "time ratio", "memory ratio"], rows)
    print(f"  check at B_global 1024: mean of the {args.world} workers' gathered losses {gathered_mean:.6f}, "
          f"naive loss {naive:.6f} (|diff| {abs(gathered_mean - naive):.2e})")
    print("  peak MiB = highest sampled RSS during the steps minus RSS before them (fresh process per row); "
          "the logits' own size is in the logits columns")
    print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
