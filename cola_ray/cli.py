"""The ``cola-ray`` command.

    cola-ray shards build SRC OUT [--labels CSV] [--max-samples N] [--max-bytes N]
    cola-ray shards verify PATH
    cola-ray tasks list
    cola-ray tasks prepare NAME SRC OUT [--seed N] [--max-samples N]
    cola-ray pretrain --config FILE [section.key=value ...]
    cola-ray demo [--workdir DIR] [section.key=value ...]
    cola-ray export --encoder REF OUT [--tracking-uri URI] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cola-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_shards = sub.add_parser("shards", help="write and check WebDataset shards")
    shards_sub = p_shards.add_subparsers(dest="shards_command", required=True)
    p_build = shards_sub.add_parser("build", help="audio folder -> tar shards + manifest")
    p_build.add_argument("src", help="folder of audio files (searched recursively)")
    p_build.add_argument("out", help="output folder or s3://bucket/prefix")
    p_build.add_argument("--labels", help="CSV of path,label[,split]")
    p_build.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    p_build.add_argument("--max-bytes", type=int, default=0, help="bytes per shard (0: no limit)")
    p_build.add_argument("--sample-rate", type=int, default=16000)
    p_build.add_argument("--no-progress", action="store_true")
    p_verify = shards_sub.add_parser("verify", help="check shards against their manifest")
    p_verify.add_argument("path", help="folder or s3://bucket/prefix holding manifest.json")

    p_tasks = sub.add_parser("tasks", help="downstream datasets -> labelled shards")
    tasks_sub = p_tasks.add_subparsers(dest="tasks_command", required=True)
    tasks_sub.add_parser("list", help="the registered tasks and their class counts in the paper")
    p_prep = tasks_sub.add_parser("prepare", help="a dataset in its native layout -> shards + task.json")
    p_prep.add_argument("name", help="task name (see `cola-ray tasks list`)")
    p_prep.add_argument("src", help="the dataset folder as unpacked (csv: the CSV or its folder)")
    p_prep.add_argument("out", help="output folder or s3://bucket/prefix")
    p_prep.add_argument("--seed", type=int, default=0, help="seed of the splits carved where none is official")
    p_prep.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    p_prep.add_argument("--no-progress", action="store_true")

    p_pre = sub.add_parser("pretrain", help="pre-train COLA on Ray")
    p_pre.add_argument("--config", help="YAML config (see jobs/configs/)")
    p_pre.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4 resume=true")

    p_demo = sub.add_parser("demo", help="synthetic corpus -> shards -> pre-training, locally")
    p_demo.add_argument("--workdir", default="cola-demo")
    p_demo.add_argument("--clips", type=int, default=300)
    p_demo.add_argument("overrides", nargs="*", help="section.key=value")

    p_export = sub.add_parser("export", help="trained encoder -> standalone folder (safetensors + config.json)")
    p_export.add_argument("--encoder", required=True,
                          help="checkpoint folder, export, MLflow run id, models:/..., runs:/..., random:<timm name>")
    p_export.add_argument("out", help="output folder")
    p_export.add_argument("--tracking-uri", default="", help="MLflow tracking URI for MLflow references")
    p_export.add_argument("--overwrite", action="store_true", help="replace an export already at OUT")

    args = parser.parse_args(argv)
    from cola_ray.config import ConfigError

    try:
        return _run(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"cola-ray: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "shards" and args.shards_command == "build":
        from cola_ray.shards import build_shards

        manifest = build_shards(args.src, args.out, labels_csv=args.labels, max_samples=args.max_samples,
                                max_bytes=args.max_bytes, sample_rate=args.sample_rate,
                                progress=not args.no_progress)
        n = sum(s["samples"] for s in manifest["shards"])
        print(f"{len(manifest['shards'])} shards, {n} samples at {args.out}")
        return 0
    if args.command == "shards" and args.shards_command == "verify":
        from cola_ray.shards import verify_shards

        problems = verify_shards(args.path)
        for problem in problems:
            print(f"BAD {problem}")
        print("OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if args.command == "tasks" and args.tasks_command == "list":
        from cola_ray.tasks import TASKS

        for task in TASKS.values():
            classes = f"{task.paper_classes} classes" if task.paper_classes else "any labels"
            print(f"{task.name:<20} {classes:<12} {task.description}")
        return 0
    if args.command == "tasks" and args.tasks_command == "prepare":
        from cola_ray.tasks import prepare_task

        try:
            summary = prepare_task(args.name, args.src, args.out, seed=args.seed,
                                   max_samples=args.max_samples, progress=not args.no_progress)
        except ValueError as e:  # TaskError: bad layout / labels; build_shards: OUT holds another build
            print(f"cola-ray: error: {e}", file=sys.stderr)
            return 2
        sizes = ", ".join(f"{n} {split}" for split, n in summary["splits"].items())
        print(f"{summary['task']}: {len(summary['classes'])} classes, {sizes}; "
              f"{summary['shards']} shards at {args.out}")
        return 0
    if args.command == "pretrain":
        from cola_ray.config import load_config
        from cola_ray.trainer import fit

        cfg = load_config(args.config, args.overrides)  # fails on unknown keys before any work
        fit(cfg)
        return 0
    if args.command == "demo":
        from cola_ray.demo import run_demo

        run_demo(args.workdir, n_clips=args.clips, overrides=args.overrides)
        return 0
    if args.command == "export":
        from cola_ray.encoders import resolve_encoder
        from cola_ray.export import export_encoder

        encoder, info = resolve_encoder(args.encoder, tracking_uri=args.tracking_uri)
        out = export_encoder(encoder, info, args.out, overwrite=args.overwrite)
        print(f"exported {info['kind']} {args.encoder} ({info['encoder']}, D={info['embedding_dim']}) to {out}")
        return 0
    raise AssertionError(args)


if __name__ == "__main__":
    sys.exit(main())
