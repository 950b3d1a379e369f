"""What online evaluation costs pre-training: off vs ``eval.mode=inline`` vs ``async``.

One local Ray, a generated corpus (labelled: it is also the evaluated task), the demo's
network and batch, the same number of steps for every mode, side by side::

    .venv/bin/python benchmarks/online_eval_bench.py                 # ~8 min on 2 CPU cores
    .venv/bin/python benchmarks/online_eval_bench.py --steps 100 --repeats 1   # ~3 min

For each mode and repeat it runs ``fit`` for ``--steps`` steps with an evaluation every
``--every`` steps and reads rank 0's training clock from the last checkpoint
(``train_seconds``: every step, log and checkpoint, evaluations included when they block
the loop) and the wall time of ``fit`` (start to finish, the async evaluations that are
still running at the end included: Ray Train waits for them). Printed: medians over the
repeats and their ratio to ``off``.

On a machine with few cores, async evaluation still competes with training for the CPU;
its Ray resources (``eval.num_cpus``) only keep Ray from scheduling the two on one share.
The inline mode blocks every rank for the evaluation's duration.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pretrain_bench import med, print_table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50, help="eval.every_steps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--clips", type=int, default=300)
    p.add_argument("--eval-cpus", type=float, default=0.5, help="eval.num_cpus of the async mode")
    args = p.parse_args()

    import ray

    from cola_ray.config import load_config
    from cola_ray.data import shards, synthetic
    from cola_ray.train.checkpoint import read_state
    from cola_ray.train.trainer import fit

    work = Path(tempfile.mkdtemp(prefix="online-eval-bench-"))
    corpus = work / "corpus"
    synthetic.make_corpus(corpus, n_clips=args.clips, seed=0)
    shards.build_shards(corpus, work / "shards", labels_csv=corpus / "labels.csv", max_samples=50)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    modes = {"off": [], "inline": ["eval.mode=inline"], "async": ["eval.mode=async", f"eval.num_cpus={args.eval_cpus}"]}
    rows: dict[str, dict[str, list[float]]] = {m: {"train_s": [], "wall_s": [], "evals": []} for m in modes}
    for rep in range(args.repeats):
        for mode, extra in modes.items():  # interleaved: drift of the shared machine hits every mode alike
            evaluated = [f"eval.every_steps={args.every}", f"eval.tasks={work / 'shards'}"] if mode != "off" else []
            cfg = load_config("jobs/configs/demo.yaml", [
                f"data.shards={work / 'shards'}", f"storage_path={work / 'runs'}", f"name={mode}-{rep}",
                f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}", "tracking.log_model=false",
                f"train.max_steps={args.steps}", "train.epochs=1000", "train.checkpoint_every_steps=100000",
                *evaluated, *extra])
            t0 = time.perf_counter()
            result = fit(cfg, echo=lambda *_: None)
            rows[mode]["wall_s"].append(time.perf_counter() - t0)
            rows[mode]["train_s"].append(read_state(result.checkpoint).train_seconds)
            from mlflow.tracking import MlflowClient

            hist = MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "eval/shards/accuracy")
            rows[mode]["evals"].append(len(hist))
            print(f"{mode} #{rep}: train {rows[mode]['train_s'][-1]:.1f}s, fit {rows[mode]['wall_s'][-1]:.1f}s, "
                  f"{len(hist)} evaluations", file=sys.stderr)
    base_train, base_wall = med(rows["off"]["train_s"]), med(rows["off"]["wall_s"])
    table = [[m, f"{med(r['train_s']):.1f}", f"{med(r['train_s']) / base_train:.2f}",
              f"{med(r['wall_s']):.1f}", f"{med(r['wall_s']) / base_wall:.2f}", f"{med(r['evals']):.0f}"]
             for m, r in rows.items()]
    print_table(f"{args.steps} steps, evaluation every {args.every}, median of {args.repeats}:", ["mode", "train s", "x off", "fit s", "x off", "evaluations"], table)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
