"""Representation quality on real audio: what pre-training adds over hand-made features.

Given a built benchmark folder (``../shared/bench``: ``OUT/pretrain/*.flac`` unlabeled and
``OUT/<task>/labels.csv`` labelled tasks with train/test splits) and a wall-clock budget::

    .venv/bin/python benchmarks/quality_bench.py /path/to/bench --minutes 30 \\
        --config jobs/configs/laptop.yaml --workdir runs/quality

it builds the pool's shards and the tasks' shards (``cola-ray shards build`` /
``cola-ray tasks prepare csv``), pre-trains within the budget (``train.max_minutes``),
probes every task with the same protocol for three encoders (the same network at random
init, ``logmel`` statistics and the pre-trained encoder) and prints the table per task
with the average; the table and every cell also go to MLflow (experiment
``cola-ray-quality``, one run per table). Interrupted, it resumes where it stopped: shards
and tasks already built are kept, pre-training resumes from its last checkpoint (the
budget counts training time across restarts), finished probes are not redone.

Extra ``key=value`` arguments override the pre-training config (e.g.
``model.similarity=bilinear model.bilinear_scale=learnable``); ``--label`` names the run so
several recipes can share a workdir (each its own pre-training, the probes of random init
and log-mel are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

COLUMNS = ("random init", "log-mel", "COLA pre-trained")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", type=Path, help="built benchmark folder (pretrain/ and <task>/labels.csv)")
    p.add_argument("--minutes", type=float, default=30.0, help="pre-training budget in minutes (default 30)")
    p.add_argument("--config", default="jobs/configs/laptop.yaml", help="pre-training config (default: the laptop recipe)")
    p.add_argument("--workdir", type=Path, default=Path("runs/quality"), help="shards, runs, MLflow store, state")
    p.add_argument("--label", default="default", help="name of this recipe's pre-training run")
    p.add_argument("--tasks", nargs="*", default=None, help="task folder names (default: every <task>/labels.csv)")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (the paper's 100)")
    p.add_argument("--standardize", action="store_true",
                   help="z-score embeddings before the probe (every column alike; default: the paper's raw probe)")
    p.add_argument("--pooling", choices=("logits", "mean"), default="logits",
                   help="a clip's segments: average the probe's logits (the paper) or the embeddings")
    p.add_argument("--online-eval", type=int, default=0, metavar="N",
                   help="evaluate every task online every N pre-training steps (eval.every_steps, async)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the pre-training config")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    table = run(args.bench, minutes=args.minutes, config=args.config, workdir=args.workdir, label=args.label,
                tasks=args.tasks, probe_epochs=args.probe_epochs, overrides=args.overrides,
                standardize=args.standardize, pooling=args.pooling, online_eval=args.online_eval)
    print(markdown(table))
    return 0


def run(bench: Path, *, minutes: float, config: str, workdir: Path, label: str = "default",
        tasks: list[str] | None = None, probe_epochs: int = 100, overrides: list[str] = (),
        standardize: bool = False, pooling: str = "logits", online_eval: int = 0, echo=print) -> dict:
    """Shards -> tasks -> pre-training within ``minutes`` -> probes -> the table (a dict:
    ``{"rows": {task: {column: test accuracy}}, "average": {column: ...}, ...}``)."""
    from cola_ray.config import load_config
    from cola_ray.data.shards import build_shards
    from cola_ray.data.tasks import prepare_task

    bench, workdir = bench.resolve(), workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / f"quality-{label}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"probes": {}}

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)

    tasks = tasks or sorted(d.name for d in bench.iterdir() if (d / "labels.csv").is_file())
    if not tasks or not (bench / "pretrain").is_dir():
        raise SystemExit(f"{bench}: expected pretrain/ and <task>/labels.csv folders (a built benchmark)")

    # 1. Shards of the unlabeled pool, and each labelled task (kept across runs).
    pool = workdir / "shards" / "pretrain"
    echo(f"[1/4] pool shards at {pool}")
    build_shards(bench / "pretrain", pool, max_samples=200, progress=False)
    for t in tasks:
        out = workdir / "shards" / t
        if not (out / "task.json").exists():
            echo(f"      task {t}")
            prepare_task("csv", bench / t / "labels.csv", out, max_samples=500, progress=False)

    # 2. Pre-training within the budget; the same run name resumes from its checkpoints.
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(config, [f"data.shards={pool}", f"storage_path={workdir / 'runs'}",
                               f"tracking.tracking_uri={tracking}", "tracking.experiment=cola-ray-quality-pretrain",
                               f"name=quality-{label}", f"train.max_minutes={minutes}",
                               *([f"eval.every_steps={online_eval}",
                                  "eval.tasks=" + ",".join(str(workdir / "shards" / t) for t in tasks)]
                                 if online_eval else []), *overrides])
    if not state.get("checkpoint"):
        from cola_ray.train.trainer import fit

        echo(f"[2/4] pre-training {cfg.model.encoder} ({cfg.model.similarity}) for {minutes:g} min")
        t0 = time.time()
        result = fit(cfg, echo=echo)
        state.update(checkpoint=result.checkpoint, run_id=result.mlflow_run_id,
                     steps=result.metrics.get("step"), pretrain_wall_s=round(time.time() - t0, 1))
        save()
    encoders = {"random init": f"random:{cfg.model.encoder}", "log-mel": "logmel",
                "COLA pre-trained": state["checkpoint"]}

    # 3. The same probe for every encoder and task (the paper's: 100 epochs, Adam 1e-3, batch 64).
    from cola_ray.downstream.probe import probe

    echo("[3/4] linear probes")
    protocol = ("|standardized" if standardize else "") + ("|mean-pooled" if pooling == "mean" else "")
    for t in tasks:
        for column, ref in encoders.items():
            key = f"{t}|{column}{protocol}"
            if key in state["probes"]:
                continue
            baseline = {"random init": "random init", "log-mel": "log-mel"}.get(column, "COLA frozen")
            r = probe(ref, str(workdir / "shards" / t), epochs=probe_epochs, baseline=baseline, standardize=standardize,
                      pooling=pooling,
                      experiment="cola-ray-quality-probes", tracking_uri=tracking,
                      cache_dir=workdir / "embeddings" / (label if column == "COLA pre-trained" else "shared"))
            state["probes"][key] = {"test": r.test_accuracy, "val": r.val_accuracy, "run_id": r.run_id}
            save()
            echo(f"      {t:<22} {column:<18} test {r.test_accuracy:.1%}")

    # 4. The table, printed and in MLflow.
    table = {"label": label, "minutes": minutes, "config": config, "overrides": list(overrides),
             "steps": state.get("steps"), "pretrain_run_id": state.get("run_id"),
             "probe": protocol.replace("|", " ").strip() or "raw (the paper's)",
             "rows": {t: {c: state["probes"][f"{t}|{c}{protocol}"]["test"]
                          for c in COLUMNS} for t in tasks}}
    table["average"] = {c: sum(row[c] for row in table["rows"].values()) / len(tasks) for c in COLUMNS}
    table_key = "table_run_id" + protocol.replace("|", "_")
    if not state.get(table_key):
        state[table_key] = _log_table(table, tracking)
        save()
    echo("[4/4] done")
    return table


def markdown(table: dict) -> str:
    head = f"| task | {' | '.join(COLUMNS)} |\n|---|" + "---|" * len(COLUMNS)
    rows = [f"| {t} | " + " | ".join(f"{100 * row[c]:.1f}" for c in COLUMNS) + " |"
            for t, row in table["rows"].items()]
    avg = "| **average** | " + " | ".join(f"**{100 * table['average'][c]:.1f}**" for c in COLUMNS) + " |"
    return "\n".join([f"recipe {table['label']}: {table['minutes']:g} min, {table.get('steps')} steps, "
                      f"probe {table.get('probe', 'raw')}, "
                      f"{table['config']} {' '.join(table['overrides'])}".rstrip(), "", head, *rows, avg])


def _log_table(table: dict, tracking_uri: str) -> str:
    from mlflow.tracking import MlflowClient

    from cola_ray.train.tracking import experiment_id

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(experiment_id(client, "cola-ray-quality", tracking_uri),
                            run_name=f"quality-{table['label']}",
                            tags={"cola_ray.kind": "quality", "cola_ray.pretrain_run_id": table["pretrain_run_id"] or ""})
    rid = run.info.run_id
    for t, row in [*table["rows"].items(), ("average", table["average"])]:
        for c, acc in row.items():
            client.log_metric(rid, f"{t}/{c.replace(' ', '_')}", acc)
    client.log_text(rid, markdown(table), "quality.md")
    client.log_dict(rid, table, "quality.json")
    client.set_terminated(rid)
    return rid


if __name__ == "__main__":
    sys.exit(main())
