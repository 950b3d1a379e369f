"""The ``cola-ray`` command.

    cola-ray shards build SRC OUT [--labels CSV] [--max-samples N] [--max-bytes N]
    cola-ray shards verify PATH
    cola-ray tasks list
    cola-ray tasks prepare NAME SRC OUT [--seed N] [--max-samples N]
    cola-ray pretrain --config FILE [section.key=value ...]
    cola-ray demo [--workdir DIR] [section.key=value ...]
    cola-ray embed --encoder REF --data SHARDS --out DIR [--remainder end|drop|pad] [--use-gpu]
    cola-ray probe --encoder REF --task SHARDS [--lr X] [--epochs N] [--baseline B]
    cola-ray finetune --encoder REF --task SHARDS [--from-scratch] [--lr X] [--epochs N] [--num-workers N]
    cola-ray sweep --encoder REF --task SHARDS [--mode probe|finetune] [--config FILE] [key=value ...]
    cola-ray suite --config FILE [key=value ...]
    cola-ray report [--experiment NAME] [--out DIR]
    cola-ray export --encoder REF OUT [--tracking-uri URI] [--overwrite]
    cola-ray replay-metrics SPOOL [--tracking-uri URI]

``cola-ray COMMAND --help`` describes a command and its options, with their defaults.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EXIT_CODES = """\
exit codes:
  0  done (a check found nothing wrong)
  1  a check found problems (shards verify) or a run failed (its traceback, then one error line)
  2  a usage or configuration error: an unknown option, config key or value, a missing file,
     an unreachable MLflow server; one error line names it (a bad config fails before any work)
"""

_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`x`, :class:`~a.B`, :ref:`t <x>`
_LITERAL = re.compile(r"``(.+?)``", re.S)


def plain_text(doc: str | None) -> str:
    """A docstring as help text: reStructuredText markup out (````x```` and ``:role:`x``` -> x,
    ``~a.b.C`` -> C, a paragraph's closing ``::`` -> ``:``), line breaks kept."""
    if not doc:
        return ""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~") else m.group(1), doc)
    text = _LITERAL.sub(r"\1", text)
    text = re.sub(r"(?m)(\S)::$", r"\1:", text)  # "... like this::" -> "... like this:"
    text = re.sub(r"(?m)^\s*::$\n?", "", text)
    return text.strip("\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs keep their line breaks; every option with a default shows it.

    A default is left out where it says nothing (None, an empty string, a flag's False) or
    where the option's help already tells it (it mentions "default"). argparse shows none
    for an option without help: every option with a default has some.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or action.default in (None, "", argparse.SUPPRESS)
                or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


def version() -> str:
    """The installed distribution's version (pyproject.toml's ``cola-ray``)."""
    from importlib import metadata

    try:
        return metadata.version("cola-ray")
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command, with its help and defaults."""
    parser = argparse.ArgumentParser(prog="cola-ray", description=plain_text(__doc__), epilog=EXIT_CODES,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray Data's INFO logging on the console too (or COLA_RAY_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
        # The one-line help is also the command's own description (shown by COMMAND --help).
        return parent.add_parser(name, help=help, description=plain_text(help), formatter_class=HelpFormatter)

    p_shards = command(sub, "shards", "write and check WebDataset shards")
    shards_sub = p_shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    p_build = command(shards_sub, "build", "audio folder -> tar shards + manifest")
    p_build.add_argument("src", help="folder of audio files (searched recursively)")
    p_build.add_argument("out", help="output folder or s3://bucket/prefix")
    p_build.add_argument("--labels", help="CSV of path,label[,split]")
    p_build.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    p_build.add_argument("--max-bytes", type=int, default=0, help="bytes per shard (0: no limit)")
    p_build.add_argument("--sample-rate", type=int, default=16000, help="audio is resampled to this rate (Hz)")
    p_build.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_verify = command(shards_sub, "verify", "check shards against their manifest (exit 1 on a problem)")
    p_verify.add_argument("path", help="folder or s3://bucket/prefix holding manifest.json")

    p_tasks = command(sub, "tasks", "downstream datasets -> labelled shards")
    tasks_sub = p_tasks.add_subparsers(dest="tasks_command", required=True, metavar="SUBCOMMAND")
    command(tasks_sub, "list", "the registered tasks and their class counts in the paper")
    p_prep = command(tasks_sub, "prepare", "a dataset in its native layout -> shards + task.json")
    p_prep.add_argument("name", help="task name (see `cola-ray tasks list`)")
    p_prep.add_argument("src", help="the dataset folder as unpacked (csv: the CSV or its folder)")
    p_prep.add_argument("out", help="output folder or s3://bucket/prefix")
    p_prep.add_argument("--seed", type=int, default=0, help="seed of the splits carved where none is official")
    p_prep.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    p_prep.add_argument("--no-progress", action="store_true", help="no progress bar")

    p_pre = command(sub, "pretrain", "pre-train COLA on Ray")
    p_pre.add_argument("--config", help="YAML config (see jobs/configs/); without it, the paper's defaults")
    p_pre.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4 resume=true "
                                                    "tracking.system_metrics=false")

    p_demo = command(sub, "demo", "synthetic corpus -> shards -> pre-training, locally")
    p_demo.add_argument("--workdir", default="cola-demo", help="folder for the corpus, shards, runs and MLflow")
    p_demo.add_argument("--clips", type=int, default=300, help="synthetic clips to generate")
    p_demo.add_argument("--probe-epochs", type=int, default=100, help="0 skips the downstream probe")
    p_demo.add_argument("overrides", nargs="*", help="section.key=value")

    encoder_help = "checkpoint folder, export, MLflow run id, models:/..., runs:/..., random:<timm name>"
    uri_help = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    p_export = command(sub, "export", "trained encoder -> standalone folder (safetensors + config.json)")
    p_export.add_argument("--encoder", required=True, help=encoder_help)
    p_export.add_argument("out", help="output folder")
    p_export.add_argument("--tracking-uri", default="", help=uri_help)
    p_export.add_argument("--overwrite", action="store_true", help="replace an export already at OUT")

    from cola_ray.downstream.tags import BASELINES as baselines

    p_embed = command(sub, "embed", "frozen embeddings of every segment of a labelled task (Ray Data)")
    p_embed.add_argument("--encoder", required=True, help=encoder_help)
    p_embed.add_argument("--data", required=True, help="labelled shards: folder or s3://bucket/prefix")
    p_embed.add_argument("--out", required=True, help="output folder (embeddings.parquet + embeddings.json)")
    p_embed.add_argument("--batch-size", type=int, default=64, help="segments per inference batch")
    p_embed.add_argument("--remainder", choices=("end", "drop", "pad"), default="end",
                         help="a clip's last partial segment: aligned to the clip's end (default), dropped, "
                              "or zero-padded (costs accuracy; for comparison)")
    p_embed.add_argument("--num-actors", type=int, default=1, help="inference actors (one encoder each)")
    p_embed.add_argument("--use-gpu", action="store_true", help="one GPU per inference actor")
    p_embed.add_argument("--tracking-uri", default="", help=uri_help)

    p_probe = command(sub, "probe", "linear probe on frozen embeddings; val/test accuracy to MLflow")
    p_probe.add_argument("--encoder", required=True, help=encoder_help)
    p_probe.add_argument("--task", required=True, help="task shards (see `cola-ray tasks prepare`)")
    p_probe.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p_probe.add_argument("--weight-decay", type=float, default=0.0, help="Adam's weight decay")
    p_probe.add_argument("--epochs", type=int, default=100, help="passes over the train split")
    p_probe.add_argument("--batch-size", type=int, default=64, help="embeddings per step")
    p_probe.add_argument("--seed", type=int, default=0, help="seed of the probe's init and batch order")
    p_probe.add_argument("--standardize", action="store_true",
                         help="z-score the embeddings with the train split's statistics (default: off, the paper)")
    p_probe.add_argument("--pooling", choices=("logits", "mean"), default="logits",
                         help="a clip's prediction: the layer's logits averaged over its segments (the paper) "
                              "or the layer on the mean of its segments' embeddings")
    p_probe.add_argument("--baseline", choices=baselines, default=None,
                         help="table column; default: 'random init' for random:<model>, else 'COLA frozen'")
    p_probe.add_argument("--experiment", default="cola-ray-downstream", help="MLflow experiment")
    p_probe.add_argument("--tracking-uri", default="", help=uri_help)
    p_probe.add_argument("--cache-dir", default="", help="embeddings cache (default $COLA_RAY_CACHE or ~/.cache/cola-ray)")
    p_probe.add_argument("--refresh", action="store_true", help="recompute the cached embeddings")
    p_probe.add_argument("--use-gpu", action="store_true", help="embed on GPU")

    p_ft = command(sub, "finetune", "fine-tune encoder + linear layer end to end (Ray Train); val/test to MLflow")
    p_ft.add_argument("--encoder", required=True, help=encoder_help)
    p_ft.add_argument("--task", required=True, help="task shards (see `cola-ray tasks prepare`)")
    p_ft.add_argument("--from-scratch", action="store_true",
                      help="supervised baseline: the encoder's architecture with random weights")
    p_ft.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate")
    p_ft.add_argument("--weight-decay", type=float, default=0.0, help="Adam's weight decay")
    p_ft.add_argument("--epochs", type=int, default=30, help="passes over the train split")
    p_ft.add_argument("--batch-size", type=int, default=64, help="global batch, split over the workers")
    p_ft.add_argument("--seed", type=int, default=0, help="seed of the head's init and the data order")
    p_ft.add_argument("--select", choices=("best", "last"), default="best",
                      help="weights evaluated on test: best validation epoch (default) or the last")
    p_ft.add_argument("--baseline", choices=baselines, default=None,
                      help="table column; default: 'supervised' with --from-scratch or random:<model>, "
                           "else 'COLA fine-tuned'")
    p_ft.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    p_ft.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker asks Ray for")
    p_ft.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p_ft.add_argument("--storage-path", default="./runs", help="Ray Train run folder (local or s3://)")
    p_ft.add_argument("--experiment", default="cola-ray-downstream", help="MLflow experiment")
    p_ft.add_argument("--tracking-uri", default="", help=uri_help)

    p_sweep = command(sub, "sweep", "Ray Tune sweep of the probe (or of fine-tuning): select on "
                                    "validation, test once")
    p_sweep.add_argument("--encoder", help=encoder_help + " (or encoder_ref in --config)")
    p_sweep.add_argument("--task", help="task shards (or task in --config)")
    p_sweep.add_argument("--config", help="YAML of sweep settings (see jobs/configs/sweep.yaml)")
    p_sweep.add_argument("--mode", choices=("probe", "finetune"), default=None,
                         help="sweep the frozen linear probe (default) or end-to-end fine-tuning")
    p_sweep.add_argument("--from-scratch", action="store_true", default=None,
                         help="with --mode finetune: the supervised baseline (random weights)")
    p_sweep.add_argument("--num-samples", type=int, help="trials (default 8)")
    p_sweep.add_argument("--max-concurrent", type=int, help="trials at once (default 2)")
    p_sweep.add_argument("--baseline", choices=baselines, default=None, help="table column (default: as probe "
                                                                             "or finetune choose)")
    p_sweep.add_argument("--experiment", help="MLflow experiment (default: cola-ray-downstream)")
    p_sweep.add_argument("--tracking-uri", help=uri_help)
    p_sweep.add_argument("--use-gpu", action="store_true", default=None, help="embed (probe) or train (finetune) on GPU")
    p_sweep.add_argument("overrides", nargs="*", help="key=value for any other setting, e.g. epoch_choices=[50,100]")

    p_suite = command(sub, "suite", "the whole downstream evaluation: tasks x baselines (sweeps), "
                                    "then the report table")
    p_suite.add_argument("--config", help="YAML of suite settings (see jobs/configs/downstream.yaml)")
    p_suite.add_argument("overrides", nargs="*",
                         help="key=value or section.key=value, e.g. encoder_ref=runs/a/checkpoint_000100 "
                              "probe.num_samples=16")

    p_report = command(sub, "report", "the paper's table (tasks x baselines) from MLflow runs")
    p_report.add_argument("--experiment", default="cola-ray-downstream", help="MLflow experiment of the runs")
    p_report.add_argument("--out", default="report", help="folder for report.md, report.csv, report.png")
    p_report.add_argument("--tracking-uri", default="", help=uri_help)

    p_replay = command(sub, "replay-metrics", "deliver an MLflow spool a run left while its server was down")
    p_replay.add_argument("spool", help="the .jsonl file named in the run's warning")
    p_replay.add_argument("--tracking-uri", default="", help=uri_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (see ``EXIT_CODES``), never raise for a usage error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0), or a usage error argparse has printed (2)
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    from cola_ray.config import ConfigError

    if args.verbose:  # read by cola_ray.console where Ray is initialised (this process and jobs)
        import os

        from cola_ray.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        return _run(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ConnectionError) as e:
        print(f"cola-ray: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a run that failed: the traceback for whoever debugs it, then one line
        traceback.print_exc()
        print(f"cola-ray: error: {args.command} failed: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
        return EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    if args.command == "shards" and args.shards_command == "build":
        from cola_ray.data.shards import build_shards

        manifest = build_shards(args.src, args.out, labels_csv=args.labels, max_samples=args.max_samples,
                                max_bytes=args.max_bytes, sample_rate=args.sample_rate,
                                progress=not args.no_progress)
        n = sum(s["samples"] for s in manifest["shards"])
        print(f"{len(manifest['shards'])} shards, {n} samples at {args.out}")
        return 0
    if args.command == "shards" and args.shards_command == "verify":
        from cola_ray.data.shards import verify_shards

        problems = verify_shards(args.path)
        for problem in problems:
            print(f"BAD {problem}")
        print("OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if args.command == "tasks" and args.tasks_command == "list":
        from cola_ray.data.tasks import TASKS

        for task in TASKS.values():
            classes = f"{task.paper_classes} classes" if task.paper_classes else "any labels"
            print(f"{task.name:<20} {classes:<12} {task.description}")
        return 0
    if args.command == "tasks" and args.tasks_command == "prepare":
        from cola_ray.data.tasks import prepare_task

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

        cfg = load_config(args.config, args.overrides)  # fails on unknown keys before any work (or import)
        from cola_ray.train.trainer import fit

        fit(cfg)
        return 0
    if args.command == "demo":
        from cola_ray.demo import run_demo

        run_demo(args.workdir, n_clips=args.clips, overrides=args.overrides, probe_epochs=args.probe_epochs)
        return 0
    if args.command == "export":
        from cola_ray.downstream.encoders import resolve_encoder
        from cola_ray.downstream.export import ExportError, export_encoder

        try:
            encoder, info = resolve_encoder(args.encoder, tracking_uri=args.tracking_uri)
            out = export_encoder(encoder, info, args.out, overwrite=args.overwrite)
        except ExportError as e:  # a tampered or unreadable export given as the reference
            print(f"cola-ray: error: {e}", file=sys.stderr)
            return 2
        print(f"exported {info['kind']} {args.encoder} ({info['encoder']}, D={info['embedding_dim']}) to {out}")
        return 0
    if args.command == "embed":
        from cola_ray.downstream.embed import embed, read_meta

        path = embed(args.encoder, args.data, args.out, batch_size=args.batch_size, remainder=args.remainder,
                     num_actors=args.num_actors, use_gpu=args.use_gpu, tracking_uri=args.tracking_uri)
        meta = read_meta(path)
        print(f"{meta['segments']} segments of {meta['clips']} clips, D={meta['dim']}, "
              f"{len(meta['classes'])} classes -> {path}")
        return 0
    if args.command == "probe":
        from cola_ray.downstream.probe import probe

        result = probe(args.encoder, args.task, lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
                       batch_size=args.batch_size, seed=args.seed, standardize=args.standardize, pooling=args.pooling,
                       baseline=args.baseline or "",
                       experiment=args.experiment, tracking_uri=args.tracking_uri, cache_dir=args.cache_dir,
                       refresh=args.refresh, use_gpu=args.use_gpu)
        print(f"validation accuracy {result.val_accuracy:.1%}, test accuracy {result.test_accuracy:.1%}; "
              f"MLflow run {result.run_id}")
        return 0
    if args.command == "finetune":
        from cola_ray.downstream.finetune import finetune

        result = finetune(args.encoder, args.task, from_scratch=args.from_scratch, lr=args.lr,
                          weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
                          seed=args.seed, select=args.select, baseline=args.baseline or "",
                          num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                          use_gpu=args.use_gpu, storage_path=args.storage_path, experiment=args.experiment,
                          tracking_uri=args.tracking_uri)
        print(f"validation accuracy {result.val_accuracy:.1%} (epoch {result.selected_epoch}), "
              f"test accuracy {result.test_accuracy:.1%}; MLflow run {result.run_id}; weights {result.checkpoint}")
        return 0
    if args.command == "sweep":
        from cola_ray.downstream.sweep_config import describe, load_sweep_config, run_sweep

        settings = load_sweep_config(args.config, args.overrides, {
            "encoder_ref": args.encoder, "task": args.task, "mode": args.mode, "from_scratch": args.from_scratch,
            "num_samples": args.num_samples,
            "max_concurrent": args.max_concurrent, "baseline": args.baseline, "experiment": args.experiment,
            "tracking_uri": args.tracking_uri, "use_gpu": args.use_gpu,
        })
        print(describe(run_sweep(settings)))
        return 0
    if args.command == "suite":
        from cola_ray.downstream.suite import load_suite_config, run_suite

        run_suite(**load_suite_config(args.config, args.overrides))  # a ConfigError is reported by main
        return 0
    if args.command == "report":
        from cola_ray.downstream.report import report

        try:
            result = report(args.experiment, args.out, tracking_uri=args.tracking_uri)
        except ValueError as e:  # no such experiment, or no tagged run in it
            print(f"cola-ray: error: {e}", file=sys.stderr)
            return 2
        print(result.markdown)
        print("written: " + ", ".join(result.files.values()) + f"; MLflow run {result.run_id}")
        return 0
    if args.command == "replay-metrics":
        from cola_ray.train.tracking import replay_spool

        sent, dropped = replay_spool(args.spool, args.tracking_uri)
        print(f"delivered {sent} metric points; {dropped} were already in the run")
        return 0
    raise AssertionError(args)


if __name__ == "__main__":
    sys.exit(main())
