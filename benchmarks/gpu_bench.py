"""GPU side of the throughput issue: encoder samples/s and the full COLA step on one CUDA GPU.

Needs a CUDA GPU (no test needs this script); without one it exits 2 with a message::

    .venv/bin/python benchmarks/gpu_bench.py            # ~3-5 min on an H100
    .venv/bin/python benchmarks/gpu_bench.py --quick    # batch 256 and 1024 only, fewer iterations

Tables:

1. ENCODER: training samples/s (forward + backward + Adam) of the backbone alone
   (``encoder.create_backbone``, default ``efficientnet_b0``, in_chans 1, global max pool)
   on random log-mel inputs of 64 x 96 (one 0.975 s crop), batch 256 / 512 / 1024, in
   fp32, bf16 autocast, bf16 + channels_last (weights and inputs), and bf16 +
   channels_last + ``torch.compile``; with peak GPU memory.
2. FULL STEP: ``model.ColaModel`` on waveform pairs already on the GPU: GPU log-mel of
   anchors and positives (one pass on 2B crops), encoder, head, bilinear loss, backward,
   Adam, in bf16 + channels_last (what ``train.precision=auto`` does on GPU), with and
   without compile; pairs/s = B / step time. Also the log-mel frontend alone.

Pairs/s of the full step is what the data pipeline must feed: divide by the per-core
rates of ``benchmarks/pipeline_bench.py`` for the CPU cores of decoding per GPU.
Timing: CUDA events around ``--iters`` steps after ``--warmup`` steps (compile warm-up
excluded and reported separately), median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

from pretrain_bench import print_table


def measure(step, batch: int, rate_key: str, args) -> dict:
    """One timed first call (compilation, cuDNN autotune), then the steady state of ``step``:
    ``{rate_key: batch items/s, "ms": per step, "mem_gib": peak allocated, "first_s"}``."""
    import torch

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, args.iters, args.warmup, args.repeats)
    return {rate_key: batch / sec, "ms": sec * 1000, "mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_s": first}


def timed(step, iters: int, warmup: int, repeats: int) -> float:
    """Median seconds per call of ``step`` over ``repeats`` runs of ``iters`` calls."""
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1000 / iters)
    return statistics.median(out)


def encoder_case(name: str, batch: int, bf16: bool, channels_last: bool, compile_: bool, args) -> dict:
    import torch

    from cola_ray.config import ModelConfig
    from cola_ray.model.encoder import create_backbone

    torch.manual_seed(0)
    model = create_backbone(ModelConfig(encoder=name, drop_path_rate=0.0)).cuda().train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 64, 96, device="cuda").contiguous(memory_format=fmt)
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return measure(step, batch, "samples_s", args)


def full_step_case(name: str, batch: int, compile_: bool, args) -> dict:
    import torch

    from cola_ray.config import FeatureConfig, ModelConfig
    from cola_ray.model.cola import ColaModel

    torch.manual_seed(0)
    model = ColaModel(FeatureConfig(), ModelConfig(encoder=name, channels_last=True)).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    anchor = torch.randn(batch, 15600, device="cuda") * 0.01
    positive = torch.randn(batch, 15600, device="cuda") * 0.01
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(anchor, positive)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return measure(step, batch, "pairs_s", args)


def logmel_case(batch: int, args) -> dict:
    import torch

    from cola_ray.config import FeatureConfig
    from cola_ray.model.features import LogMel

    frontend = LogMel(FeatureConfig()).cuda()
    wave = torch.randn(2 * batch, 15600, device="cuda") * 0.01
    sec = timed(lambda: frontend(wave), args.iters, args.warmup, args.repeats)
    return {"crops_s": 2 * batch / sec, "ms": sec * 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--encoder", default="efficientnet_b0")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 256 512 1024 (quick 256 1024)")
    p.add_argument("--iters", type=int, default=None, help="steps per timed run (default 20, quick 10)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median (default 3, quick 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args(argv)
    args.batches = args.batches or ([256, 1024] if args.quick else [256, 512, 1024])
    args.iters = args.iters or (10 if args.quick else 20)
    args.repeats = args.repeats or (2 if args.quick else 3)

    import torch

    if not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA GPU (torch.cuda.is_available() is False here); nothing measured.",
              file=sys.stderr)
        return 2
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    torch.backends.cudnn.benchmark = True
    t_all = time.perf_counter()

    variants = [("fp32", False, False, False), ("bf16", True, False, False),
                ("bf16 + channels_last", True, True, False)]
    if not args.no_compile:
        variants.append(("bf16 + channels_last + compile", True, True, True))
    rows = []
    for batch in args.batches:
        base = None
        for label, bf16, cl, comp in variants:
            r = encoder_case(args.encoder, batch, bf16, cl, comp, args)
            base = base or r["samples_s"]
            rows.append([f"B={batch} {label}", f"{r['samples_s']:.0f}", f"{r['ms']:.1f}",
                         f"{r['samples_s'] / base:.2f}", f"{r['mem_gib']:.1f}", f"{r['first_s']:.1f}"])
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    enc_rows = rows

    rows = []
    for batch in args.batches:
        for comp in ([False] if args.no_compile else [False, True]):
            r = full_step_case(args.encoder, batch, comp, args)
            lm = logmel_case(batch, args)
            rows.append([f"B={batch} bf16 + channels_last" + (" + compile" if comp else ""), f"{r['pairs_s']:.0f}",
                         f"{r['ms']:.1f}", f"{r['mem_gib']:.1f}", f"{r['first_s']:.1f}", f"{lm['ms']:.2f}",
                         f"{lm['crops_s']:.0f}"])
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()

    print()
    print(f"command: {command}")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; encoder {args.encoder}; "
          f"median of {args.repeats} x {args.iters} steps after {args.warmup} warm-up")
    print_table("ENCODER: training samples/s (fwd + bwd + Adam) on 1 x 64 x 96 log-mel",
                ["batch / variant", "samples/s", "ms/step", "x fp32", "peak GiB", "first step s"], enc_rows)
    print_table("FULL STEP: waveform pairs -> GPU log-mel -> encoder -> bilinear loss -> Adam",
                ["batch / variant", "pairs/s", "ms/step", "peak GiB", "first step s", "log-mel ms", "log-mel crops/s"],
                rows)
    print("  pairs/s of the full step is the rate the data pipeline must sustain per GPU")
    print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
