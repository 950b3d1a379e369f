"""A trained encoder as a standalone artefact: safetensors weights + one JSON file.

An export folder holds::

    weights.safetensors   the WaveformEncoder's state (backbone weights and BN statistics)
    config.json           format, timm name, FeatureConfig, ModelConfig, embedding size,
                          sample rate, segment samples, sha256 of the weights, provenance

and loads with nothing but torch, timm and safetensors: no Ray, no MLflow, no network,
and nothing is ever unpickled. Anything that does not match what ``config.json`` says
(changed bytes, a missing or extra tensor, a wrong shape, an unknown format) is refused
with an :class:`ExportError` naming the file::

    encoder, info = resolve_encoder("models:/cola/3")       # cola_ray.downstream.encoders
    export_encoder(encoder, info, "exports/cola-v3")
    encoder = load_encoder("exports/cola-v3")               # (B, S) 16 kHz -> (B, D)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cola_ray.data import storage
from cola_ray.config import Config, ConfigError, DataConfig
from cola_ray.model.encoder import WaveformEncoder

FORMAT = "cola-ray-encoder/1"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
PROVENANCE_KEYS = ("ref", "kind", "mlflow_run_id", "step", "shards")


class ExportError(ValueError):
    """An export folder that cannot be trusted or used; the message names the file."""


def export_encoder(encoder: WaveformEncoder, info: Mapping[str, Any], out_dir: str | Path, *,
                   overwrite: bool = False) -> Path:
    """Write ``encoder`` to ``out_dir`` (created); returns the folder.

    ``info`` is what :func:`cola_ray.downstream.encoders.resolve_encoder` returns next to the encoder.
    Only ``info["model"]`` (the ModelConfig, as a dict or dataclass) is required: a
    WaveformEncoder does not keep its timm name. ``segment_samples`` defaults to the
    training crop (15600 = 96 frames); the feature config is the encoder's own;
    ``ref``, ``kind``, ``mlflow_run_id``, ``step`` and ``shards`` are kept as provenance.
    The weights are written first and ``config.json`` last (atomically), so a folder
    with a config is a complete export.
    """
    out = Path(out_dir)
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out / CONFIG_FILE} exists; pass overwrite=True to replace that export")
    if "model" not in info:
        raise ValueError("export_encoder needs info['model'] (the ModelConfig): the timm name is not in the weights")
    model_cfg = _as_dict(info["model"])
    features_cfg = dataclasses.asdict(encoder.frontend.cfg)
    # The same checks a loader makes, before anything is written.
    cfg = _configs(features_cfg, model_cfg, where="info")
    built = _timm_name(encoder, cfg.model.encoder)
    if cfg.model.encoder.split(".")[0] != built.split(".")[0]:  # "name.tag" is the same architecture
        raise ValueError(f"info['model']['encoder']={cfg.model.encoder!r} but the encoder's backbone is {built!r}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})

    import timm

    config = {
        "format": FORMAT,
        "encoder": cfg.model.encoder,
        "embedding_dim": int(encoder.embedding_dim),
        "sample_rate": int(encoder.sample_rate),
        "segment_samples": int(info.get("segment_samples") or DataConfig().segment_samples),
        "features": features_cfg,
        "model": dataclasses.asdict(cfg.model),
        "weights_sha256": storage.sha256_file(out / WEIGHTS_FILE),
        "provenance": {
            **{k: info.get(k) for k in PROVENANCE_KEYS if info.get(k) not in (None, "")},
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
        },
    }
    storage.write_bytes(str(out / CONFIG_FILE), (json.dumps(config, indent=1) + "\n").encode())  # atomic
    return out


def load_encoder(path: str | Path, *, device: str | torch.device = "cpu") -> WaveformEncoder:
    """An export folder (or its ``config.json``) -> the encoder, in eval mode, on ``device``.

    The module maps 16 kHz waveforms ``(B, S)`` float to embeddings ``(B, embedding_dim)``.
    """
    return load_export(path, device=device)[0]


def load_export(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[WaveformEncoder, dict[str, Any]]:
    """Like :func:`load_encoder`, and also return the export's ``config.json`` as a dict."""
    folder, config = read_config(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ExportError(f"{weights_path} is missing (named by {config_path})")
    actual = storage.sha256_file(weights_path)
    if actual != config["weights_sha256"]:
        raise ExportError(
            f"{weights_path}: sha256 {actual} does not match {config['weights_sha256']} in "
            f"{config_path}; the weights were changed or damaged after export"
        )
    cfg = _configs(config["features"], config["model"], where=str(config_path))
    if cfg.features.sample_rate != config["sample_rate"]:
        raise ExportError(
            f"{config_path}: sample_rate {config['sample_rate']} differs from "
            f"features.sample_rate {cfg.features.sample_rate}"
        )
    try:
        # Random init is overwritten below; fork_rng keeps the caller's RNG stream unchanged.
        with torch.random.fork_rng(devices=[]):
            encoder = WaveformEncoder(cfg.features, cfg.model)
    except ValueError as e:
        raise ExportError(f"{config_path}: cannot build the encoder: {e}") from e
    try:
        tensors = load_file(str(weights_path), device="cpu")  # safetensors: no pickle
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights_path} is not a readable safetensors file: {e}") from e
    _check_tensors(tensors, encoder.state_dict(), weights_path)
    encoder.load_state_dict(tensors, strict=True)
    if encoder.embedding_dim != config["embedding_dim"]:
        raise ExportError(
            f"{config_path}: embedding_dim {config['embedding_dim']} but the encoder built from it "
            f"gives {encoder.embedding_dim}"
        )
    return encoder.eval().to(device), config


def read_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(folder, config)`` of an export given its folder or its ``config.json``; checked."""
    path = Path(path)
    if path.is_dir():
        folder, config_path = path, path / CONFIG_FILE
    elif path.name == CONFIG_FILE:
        folder, config_path = path.parent, path
    elif path.exists():
        raise ExportError(f"{path} is neither an export folder nor its {CONFIG_FILE}")
    else:
        raise FileNotFoundError(f"no such export folder or {CONFIG_FILE}: {path}")
    if not config_path.is_file():
        raise FileNotFoundError(f"not a cola-ray export (no {CONFIG_FILE}): {folder}")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ExportError(f"{config_path} must hold a JSON object")
    if config.get("format") != FORMAT:
        raise ExportError(
            f"{config_path}: unknown export format {config.get('format')!r}; this cola-ray reads {FORMAT!r}"
        )
    expected = {"encoder": str, "embedding_dim": int, "sample_rate": int, "segment_samples": int,
                "features": dict, "model": dict, "weights_sha256": str}
    for key, kind in expected.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ExportError(f"{config_path}: '{key}' must be a {kind.__name__}, got {config.get(key)!r}")
    if config["model"].get("encoder") != config["encoder"]:
        raise ExportError(f"{config_path}: 'encoder' and model.encoder differ")
    if config["segment_samples"] < config["features"].get("win_length", 0):
        raise ExportError(f"{config_path}: segment_samples is shorter than one STFT window")
    return folder, config


# ---- helpers ---------------------------------------------------------------------------

def _configs(features: Mapping[str, Any], model: Mapping[str, Any], where: str) -> Config:
    """Rebuild and check the two config sections (unknown keys and wrong types refused)."""
    try:
        return Config.from_dict({"features": dict(features), "model": dict(model)})
    except ConfigError as e:
        raise ExportError(f"{where}: {e}") from e


def _check_tensors(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_some(missing)}")
        if extra:
            parts.append(f"unexpected tensor(s) {_some(extra)}")
        raise ExportError(f"{path}: {'; '.join(parts)}")
    for name, want in expected.items():
        got = found[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ExportError(
                f"{path}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, the encoder needs "
                f"{want.dtype} {tuple(want.shape)}"
            )


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _timm_name(encoder: WaveformEncoder, default: str) -> str:
    # timm records the architecture it built; models built outside timm.create_model may not.
    pretrained = getattr(encoder.backbone, "pretrained_cfg", None) or {}
    return pretrained.get("architecture", default)


def _as_dict(value: Any) -> dict[str, Any]:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
