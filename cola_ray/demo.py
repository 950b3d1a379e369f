"""``cola-ray demo``: the whole pre-training path on one machine, from nothing.

Generates a small synthetic corpus (clips with clip-level character, so COLA has
something to learn), writes shards, pre-trains a small timm encoder with 2 Ray
workers on a local Ray, logs to a local MLflow store, and says how to open the UI.
``jobs/configs/demo.yaml`` is the same configuration for ``ray job submit``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from cola_ray.config import Config, load_config

DEMO_OVERRIDES = (
    "model.encoder=mobilenetv3_small_050",
    "model.drop_path_rate=0.0",
    "train.batch_size=64",
    "train.num_workers=2",
    # 2 workers x 0.5 CPU leave a core to Ray Data's decode tasks on a 2-core laptop.
    "train.cpus_per_worker=0.5",
    "train.lr=0.001",
    "train.epochs=50",
    "train.log_every_steps=5",
    "train.checkpoint_every_steps=50",
    "data.shuffle_buffer=256",
    "data.decode_num_cpus=0.5",
    "tracking.experiment=cola-ray-demo",
)


def demo_config(workdir: str | Path, overrides: Sequence[str] = ()) -> Config:
    workdir = Path(workdir).resolve()
    return load_config(None, [
        *DEMO_OVERRIDES,
        f"data.shards={workdir / 'shards'}",
        f"storage_path={workdir / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        *overrides,
    ])


def run_demo(workdir: str | Path = "cola-demo", n_clips: int = 300, overrides: Sequence[str] = (),
             echo=print):
    """Corpus -> shards -> pre-training; returns the :class:`~cola_ray.trainer.FitResult`."""
    from cola_ray import shards, synthetic
    from cola_ray.trainer import fit

    workdir = Path(workdir).resolve()
    cfg = demo_config(workdir, overrides)
    corpus = workdir / "corpus"
    if not (corpus / "labels.csv").exists():
        echo(f"[1/3] Generating {n_clips} synthetic clips in {corpus}")
        synthetic.make_corpus(corpus, n_clips=n_clips, seed=cfg.train.seed)
    labels = next(corpus.glob("*.csv"))
    echo(f"[2/3] Writing shards to {cfg.data.shards}")
    shards.build_shards(corpus, cfg.data.shards, labels_csv=labels, max_samples=50,
                        progress=os.isatty(1))
    echo(f"[3/3] Pre-training {cfg.model.encoder} with {cfg.train.num_workers} Ray workers")
    result = fit(cfg, echo=echo)
    echo("")
    echo("Open the run in the MLflow UI:")
    echo(f"    mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1 --port 5000")
    echo("    then browse http://127.0.0.1:5000 (experiment 'cola-ray-demo')")
    return result
