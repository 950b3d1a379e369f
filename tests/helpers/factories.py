"""Small things several test modules build the same way: a labelled task, a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cola_ray.data import tasks
from cola_ray.train.checkpoint import TrainState, save_checkpoint
from cola_ray.config import Config, ModelConfig, load_config


def make_shards(root: Path, *, n_clips: int, seconds: float, seed: int, max_samples: int,
                out: str | Path | None = None, labels: bool = True) -> str | Path:
    """The synthetic corpus (:func:`cola_ray.data.synthetic.make_corpus`: ``n_clips`` clips of
    ``seconds``, kept in ``root/clips``) as shards of ``max_samples`` at ``out`` (default
    ``root/shards``; a folder or s3://), with the family labels in each sample's json unless
    ``labels=False``. Returns ``out``: the one corpus-and-shards maker of the tests."""
    from cola_ray.data import shards, synthetic

    csv = synthetic.make_corpus(root / "clips", n_clips=n_clips, seconds=seconds, seed=seed)
    out = root / "shards" if out is None else out
    shards.build_shards(root / "clips", out, labels_csv=csv if labels else None, max_samples=max_samples,
                        progress=False)
    return out


def labelled_task(root: Path, classes: list[str], *, n_clips: int, name: str, max_samples: int) -> Path:
    """Synthetic clips of ``classes`` (1.5 s, kept in ``root/clips``) -> labelled shards under
    ``root/shards`` with a task.json listing ``classes`` in the given order; returns ``root``."""
    tasks.synthetic_task(root / "shards", n_clips=n_clips, seconds=1.5, n_classes=len(classes), classes=classes,
                         name=name, max_samples=max_samples, clips_dir=root / "clips")
    return root


def hand_made_checkpoint(folder: Path, *, step: int = 7, mlflow_run_id: str = "") -> str:
    """A pre-training checkpoint (test_efficientnet, no stochastic depth) as training writes them,
    at ``step`` of the MLflow run ``mlflow_run_id`` (none by default)."""
    from cola_ray.model.cola import ColaModel

    cfg = Config(model=ModelConfig(encoder="test_efficientnet", drop_path_rate=0.0, proj_dim=32))
    torch.manual_seed(1)
    model = ColaModel(cfg.features, cfg.model)
    state = TrainState(step=step, config=cfg.to_dict(), mlflow_run_id=mlflow_run_id)
    return str(save_checkpoint(folder / f"checkpoint_{step:09d}", model, None, state))


def tiny_config(tmp_path: Path, shards_path, tracking_uri: str, *extra: str) -> Config:
    """Pre-training at test scale: test_efficientnet, 2 workers x 0.5 CPU, global batch 16,
    a log line every step, checkpoints every 10, no retries; ``extra`` overrides win."""
    return load_config(None, [
        f"data.shards={shards_path}", "data.shuffle_buffer=64", "data.decode_num_cpus=0.5",
        "model.encoder=test_efficientnet", "model.drop_path_rate=0.0", "model.proj_dim=64",
        "train.batch_size=16", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.lr=0.002",
        "train.epochs=100", "train.log_every_steps=1", "train.checkpoint_every_steps=10",
        "train.max_failures=0",
        f"storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={tracking_uri}",
        "tracking.experiment=test-pretrain", *extra,
    ])


# ---- a task any working downstream path learns, and recomputations of what a run reported ----

TONE_BANDS = {"low": (200.0, 300.0), "mid": (600.0, 900.0), "high": (1800.0, 2700.0), "top": (5000.0, 7000.0)}
"""Class -> frequency band (Hz) of :func:`tone_task`; task.json order, deliberately not sorted."""


def tone_task(root: Path, *, bands: dict[str, tuple[float, float]] | None = None,
              per_split: tuple[int, int, int] = (12, 3, 5), seconds: float = 1.0, seed: int = 0,
              name: str = "tones-by-band", max_samples: int = 8) -> Path:
    """A task whose classes differ only in frequency: every clip is one sine (frequency
    log-uniform in its class's band, random phase and level) over a faint white-noise floor.

    ``per_split`` clips of every class go to train / validation / test (default 12 / 3 / 5:
    with the 4 default bands, 48 / 12 / 20 clips). Any encoder that keeps spectral
    information (log-mel statistics, a random or a hand-made checkpoint's CNN, one
    trained from scratch for a few epochs) separates these classes, so an accuracy near
    chance (1 / number of classes) means the downstream path is broken, not the data hard.
    Clips in ``root/clips`` (with labels.csv), shards + task.json in ``root/shards``;
    returns the shards folder. Same arguments -> same clips.
    """
    import csv
    import json

    import numpy as np
    import soundfile as sf

    from cola_ray.data import shards, storage

    bands = dict(bands or TONE_BANDS)
    sr = 16000
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    clips, rows = root / "clips", []
    for c, (label, (lo, hi)) in enumerate(bands.items()):
        (clips / label).mkdir(parents=True, exist_ok=True)
        splits = ["train"] * per_split[0] + ["validation"] * per_split[1] + ["test"] * per_split[2]
        for i, split in enumerate(splits):
            rng = np.random.default_rng([seed, c, i])
            f = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            wave = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + 0.05 * rng.standard_normal(n)
            wave = (rng.uniform(0.3, 0.9) * wave / np.abs(wave).max()).astype(np.float32)
            rel = f"{label}/clip_{i + 1:03d}.flac"
            sf.write(clips / rel, wave, sr, format="FLAC", subtype="PCM_16")
            rows.append((rel, label, split))
    with open(clips / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    out = root / "shards"
    shards.build_shards(clips, out, labels_csv=clips / "labels.csv", max_samples=max_samples, progress=False)
    info = {"format": tasks.TASK_FORMAT, "task": name, "seed": seed,
            "classes": [{"index": i, "label": label} for i, label in enumerate(bands)]}
    storage.write_bytes(storage.join(str(out), tasks.TASK_FILE), json.dumps(info, indent=1).encode("utf-8") + b"\n")
    return out


def logged_probe_accuracy(client, run_id: str, split: str = "test") -> float:
    """Clip accuracy on ``split`` of the probe layer a probe / probe-sweep run logged
    (``probe/probe.safetensors``), on the embeddings the run names (tag ``cola_ray.embeddings``):
    what the run's ``<split>_accuracy`` must be, recomputed from what it saved."""
    import tempfile

    from safetensors.torch import load_file

    from cola_ray.downstream.embed import load_embeddings
    from cola_ray.downstream.probe import evaluate

    run = client.get_run(run_id)
    emb = load_embeddings(run.data.tags["cola_ray.embeddings"])
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        weights = load_file(client.download_artifacts(run_id, "probe/probe.safetensors", tmp))
    layer = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    layer.load_state_dict(weights)
    return evaluate(layer, emb, split)["accuracy"]


def finetuned_accuracy(checkpoint: str | Path, task: str | Path, split: str = "test") -> float:
    """Clip accuracy on ``split`` of the model a fine-tuning run saved (``model.safetensors`` +
    ``finetune.json`` in ``checkpoint``), evaluated again here, in this process, on the
    task's shards: what the run's ``<split>_accuracy`` must be."""
    import json

    from safetensors.torch import load_file

    from cola_ray.data import shards
    from cola_ray.downstream.finetune import Classifier, evaluate_split
    from cola_ray.model.encoder import WaveformEncoder

    meta = json.loads((Path(checkpoint) / "finetune.json").read_text())
    cfg = Config.from_dict({"features": meta["features"], "model": meta["model"]})
    core = Classifier(WaveformEncoder(cfg.features, cfg.model), int(meta["embedding_dim"]), len(meta["classes"]))
    core.load_state_dict(load_file(str(Path(checkpoint) / "model.safetensors")))
    data = {"classes": meta["classes"], "sample_rate": cfg.features.sample_rate, "segment_samples": 15600,
            "remainder": "end", "endpoint_url": "", "region": ""}
    return evaluate_split(core, shards.shard_urls(str(task)), split, data, torch.device("cpu"), 8)["accuracy"]
