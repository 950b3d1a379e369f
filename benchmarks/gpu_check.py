"""The steps of ``benchmarks/gpu_check.sh``: one CUDA check each, one result line each.

``python benchmarks/gpu_check.py STEP`` runs one step and prints ``RESULT <step> | <status> |
<figures>`` (status ``ok``, ``FAIL`` or ``skip``); the shell script runs every step under its
own time limit and gathers the lines into one table. Steps:

- ``cuda``: device, capability, bf16 support, torch / torchaudio / timm versions.
- ``nccl``: a 1-GPU NCCL process group (all_reduce); through Ray Train (``TorchTrainer``,
  ``use_gpu``, backend nccl) when Ray is installed, else torch.distributed alone.
- ``logmel``: GPU log-mel (``model.features.LogMel``) against CPU on the same waveforms:
  max abs error in log units.
- ``pretrain``: ``ColaModel`` (the demo's mobilenetv3_small_050) in bf16 autocast +
  channels_last + ``torch.compile`` for ``--steps`` steps on generated clips (pairs cut from
  32 synthetic clips of 4 families): the loss must fall (first 20 vs last 20 steps).
- ``hear``: the HEAR API (``cola_ray.hear``) on CUDA: scene and timestamp embeddings of a
  hand-made checkpoint, shapes and finiteness.
- ``embed``: ``cola-ray embed --use-gpu`` (Ray Data with a GPU actor) on a small labelled task.

Without a CUDA GPU every step but ``cuda`` prints ``skip`` (the script still parses and runs:
CI checks that much).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
"""``cpu`` runs the logmel / pretrain / hear steps on the CPU (no compile, the loss check
still applies): how CI checks that the script is not broken without a GPU."""


def result(step: str, status: str, figures: str) -> None:
    print(f"RESULT {step} | {status} | {figures}", flush=True)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def step_cuda(args) -> None:
    import torch

    versions = f"torch {torch.__version__}"
    for m in ("torchaudio", "timm", "ray"):
        versions += f", {m} {__import__(m).__version__}" if has(m) else f", no {m}"
    if not torch.cuda.is_available():
        result("cuda", "skip", f"no CUDA GPU ({versions})")
        return
    p = torch.cuda.get_device_properties(0)
    result("cuda", "ok", f"{p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                         f"bf16 {torch.cuda.is_bf16_supported()}, {versions}")


def _all_reduce_once() -> float:
    import torch
    import torch.distributed as dist

    x = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    return float(x[0])


def step_nccl(args) -> None:
    import torch

    if has("ray"):
        import ray
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        def loop(_):
            import torch.distributed as dist

            ray.train.report({"value": _all_reduce_once(), "backend": dist.get_backend()})

        ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            res = TorchTrainer(loop, torch_config=TorchConfig(backend="nccl"),
                               scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=True),
                               run_config=ray.train.RunConfig(storage_path=tmp, name="nccl")).fit()
        ray.shutdown()
        ok = res.metrics["value"] == 1.0 and res.metrics["backend"] == "nccl"
        result("nccl", "ok" if ok else "FAIL", f"Ray Train 1 worker, backend {res.metrics['backend']}, "
                                               f"all_reduce {res.metrics['value']}")
        return
    import torch.distributed as dist

    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("nccl", init_method=f"file://{f.name}", rank=0, world_size=1)
        value = _all_reduce_once()
        dist.destroy_process_group()
    result("nccl", "ok" if value == 1.0 else "FAIL", f"torch.distributed only (no Ray installed), all_reduce {value}")


def step_logmel(args) -> None:
    import torch

    from cola_ray.config import FeatureConfig
    from cola_ray.model.features import LogMel

    gen = torch.Generator().manual_seed(0)
    wave = torch.randn(64, 15600, generator=gen) * 0.1
    cpu = LogMel(FeatureConfig())(wave)
    gpu = LogMel(FeatureConfig()).to(DEVICE)(wave.to(DEVICE)).cpu()
    err = float((cpu - gpu).abs().max())
    result("logmel", "ok" if err < 1e-2 else "FAIL", f"max abs(GPU - CPU) = {err:.2e} over {tuple(cpu.shape)}")


def _pairs(n_clips: int = 32, seconds: float = 3.0, seed: int = 0):
    import numpy as np
    import torch

    from cola_ray.data import synthetic

    rng = np.random.default_rng(seed)
    families = list(synthetic.FAMILIES)
    clips = np.stack([synthetic.synth_clip(families[i % len(families)], int(16000 * seconds), 16000, rng)
                      for i in range(n_clips)])
    return torch.from_numpy(clips), rng


def step_pretrain(args) -> None:
    import numpy as np
    import torch

    from cola_ray.config import load_config
    from cola_ray.model.cola import ColaModel

    cfg = load_config(None, ["model.encoder=mobilenetv3_small_050", "model.drop_path_rate=0.0",
                             "model.similarity=cosine"])
    torch.manual_seed(0)
    model = ColaModel(cfg.features, cfg.model).to(DEVICE).to(memory_format=torch.channels_last)
    forward = torch.compile(model) if DEVICE == "cuda" else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clips, rng = _pairs()
    clips = clips.to(DEVICE)
    seg, batch, losses = cfg.data.segment_samples, 32, []
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, clips.shape[0], batch)).to(DEVICE)
        starts = rng.integers(0, clips.shape[1] - seg, (2, batch))
        a = torch.stack([clips[i, s:s + seg] for i, s in zip(idx.tolist(), starts[0])])
        p = torch.stack([clips[i, s:s + seg] for i, s in zip(idx.tolist(), starts[1])])
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = forward(a, p, clip_ids=idx)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
        if step == 0:
            first_s = time.perf_counter() - t0
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    first, last = float(np.mean(losses[:20])), float(np.mean(losses[-20:]))
    result("pretrain", "ok" if last < first - 0.2 and np.isfinite(losses).all() else "FAIL",
           f"{args.steps} steps bf16+channels_last" + ("+compile" if DEVICE == "cuda" else " on CPU") + f", loss {first:.2f} -> {last:.2f}, "
           f"compile {first_s:.0f}s, {(args.steps - 1) / (time.perf_counter() - t0 - first_s):.1f} steps/s")


def _checkpoint(folder: Path) -> str:
    import torch

    from cola_ray.config import Config, ModelConfig
    from cola_ray.model.cola import ColaModel
    from cola_ray.train.checkpoint import TrainState, save_checkpoint

    cfg = Config(model=ModelConfig(encoder="mobilenetv3_small_050", drop_path_rate=0.0))
    torch.manual_seed(1)
    return str(save_checkpoint(folder / "checkpoint_000000001", ColaModel(cfg.features, cfg.model), None,
                               TrainState(step=1, config=cfg.to_dict())))


def step_hear(args) -> None:
    import torch

    from cola_ray import hear

    from cola_ray.downstream.encoders import resolve_encoder
    from cola_ray.downstream.export import export_encoder

    with tempfile.TemporaryDirectory() as tmp:
        encoder, info = resolve_encoder(_checkpoint(Path(tmp)))
        model = hear.load_model(str(export_encoder(encoder, info, Path(tmp) / "export"))).to(DEVICE)
        audio = torch.randn(3, 16000 * 2, device=DEVICE) * 0.1
        scene = hear.get_scene_embeddings(audio, model)
        frames, stamps = hear.get_timestamp_embeddings(audio, model)
    ok = scene.device.type == DEVICE and scene.shape[0] == 3 and bool(torch.isfinite(scene).all()) and frames.shape[0] == 3
    result("hear", "ok" if ok else "FAIL", f"scene {tuple(scene.shape)} on {scene.device}, "
                                           f"timestamps {tuple(frames.shape)}")


def step_embed(args) -> None:
    if not has("ray"):
        result("embed", "skip", "Ray is not installed in this image")
        return
    import subprocess

    from cola_ray.data import tasks

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tasks.synthetic_task(tmp / "task", n_clips=64, seconds=2.0, n_classes=4, max_samples=32)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cola_ray.cli", "embed", "--encoder", _checkpoint(tmp),
                               "--data", str(tmp / "task"), "--out", str(tmp / "emb"), "--use-gpu"],
                              capture_output=True, text=True)
        ok = done.returncode == 0 and (tmp / "emb").is_dir()
        result("embed", "ok" if ok else "FAIL", f"{time.perf_counter() - t0:.0f}s"
               + ("" if ok else f": {(done.stderr or done.stdout)[-300:]!r}"))


STEPS = {"cuda": step_cuda, "nccl": step_nccl, "logmel": step_logmel, "pretrain": step_pretrain,
         "hear": step_hear, "embed": step_embed}


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--steps", type=int, default=300, help="pre-training steps of the pretrain step")
    args = p.parse_args()
    import torch

    runs_on_cpu = DEVICE == "cpu" and args.step in ("logmel", "pretrain", "hear")
    if args.step != "cuda" and not torch.cuda.is_available() and not runs_on_cpu:
        result(args.step, "skip", "no CUDA GPU")
        return 0
    try:
        STEPS[args.step](args)
    except Exception as e:  # one line in the table, the traceback on stderr
        import traceback

        traceback.print_exc()
        result(args.step, "FAIL", f"{type(e).__name__}: {str(e)[:200]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
