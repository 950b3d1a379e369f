"""One name for a trained encoder, wherever it lives: :func:`resolve_encoder`.

Every command that takes ``--encoder REF`` resolves it here. A reference is one of::

    runs/cola-a/checkpoint_000000500        checkpoint folder (model.safetensors + state.json)
    s3://bucket/runs/cola-a/checkpoint_...  the same on S3 (downloaded to a temp folder)
    exports/cola-v3  or  .../config.json    export folder (cola_ray.downstream.export)
    s3://bucket/exports/cola-v3             the same on S3
    5ea2f52d7c37475380bb917b3ef486de        MLflow run id: its latest checkpoints/ artifact,
                                            else the encoder it logged
    models:/cola/3  models:/cola@prod       MLflow Model Registry version or alias
    models:/m-<id>                          MLflow logged model
    runs:/<run id>/encoder                  MLflow model logged in a run
    runs:/<run id>/checkpoints/checkpoint_000000500   a checkpoint copied into a run
    random:efficientnet_b0                  random init (seed 0), default features: a baseline
    logmel                                  log-mel mean + std over frames (default features):
                                            the hand-made baseline, nothing learned

Whatever the source, the result is the same: a :class:`~cola_ray.model.encoder.WaveformEncoder`
in eval mode on CPU ((B, S) 16 kHz waveforms -> (B, D)) and an ``info`` dict (JSON-able)
saying what it is and where it came from, which :func:`cola_ray.downstream.export.export_encoder`
takes as is. Weights are read from safetensors, or from an MLflow ``pt2`` model (MLflow
checks it holds no pickle); pickled MLflow models are refused. A reference that resolves
to nothing raises :class:`EncoderNotFound` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any, Mapping

import torch

from cola_ray.data import storage
from cola_ray.train.checkpoint import MODEL_FILE, STATE_FILE, load_encoder as load_checkpoint_encoder, read_state
from cola_ray.config import Config, DataConfig, FeatureConfig, ModelConfig
from cola_ray.model.encoder import LOGMEL, LogMelStats, WaveformEncoder
from cola_ray.downstream.export import CONFIG_FILE, WEIGHTS_FILE, load_export
from cola_ray.downstream.tags import (ARCHITECTURE_FROM_TAG, CHECKPOINT_STEP_TAG, ENCODER_KIND_TAG, ENCODER_TAG,
                                      PRETRAIN_EXPERIMENT_TAG, PRETRAIN_RUN_NAME_TAG, PRETRAIN_RUN_TAG)

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
ENCODER_URI_TAG = "cola_ray.encoder_uri"  # set by the train loop on the run that logged the encoder
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")

KINDS = (
    "expected one of: a checkpoint folder (model.safetensors + state.json, local or s3://), an "
    "export folder or its config.json (local or s3://), an MLflow run id, an MLflow model URI "
    "(models:/<name>/<version>, models:/<name>@<alias>, models:/m-<id>, runs:/<run id>/<path>), "
    "random:<timm model name>, or logmel (hand-made log-mel statistics)"
)


class EncoderNotFound(FileNotFoundError):
    """An ``--encoder`` reference that does not resolve; the message names it."""


def resolve_encoder(ref: str, *, tracking_uri: str = "") -> tuple[WaveformEncoder, dict[str, Any]]:
    """``ref`` -> ``(encoder, info)``; the encoder is in eval mode on CPU.

    ``info`` keys: ``ref``, ``kind`` (checkpoint, export, mlflow-model, random, features), ``source``
    (what was actually read), ``encoder`` (timm name), ``embedding_dim``, ``sample_rate``,
    ``segment_samples``, ``features`` and ``model`` (config dicts), ``mlflow_run_id``,
    ``step`` and ``shards`` (empty / None when unknown). ``tracking_uri`` is used for MLflow
    references: empty means ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.
    """
    ref = str(ref).strip()
    if not ref:
        raise EncoderNotFound(f"empty encoder reference; {KINDS}")
    if ref.startswith(RANDOM_PREFIX):
        return _random(ref)
    if ref == LOGMEL:
        return _logmel(ref)
    if ref.startswith(("models:/", "runs:/")):
        return _from_mlflow_uri(ref, _tracking_uri(tracking_uri))
    if storage.is_s3(ref):
        return _from_s3(ref)
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    if path.exists():
        return _from_local(path, ref)
    if _RUN_ID.fullmatch(ref):
        return _from_run(ref, _tracking_uri(tracking_uri))
    raise EncoderNotFound(f"encoder reference {ref!r} names no file, folder or MLflow run; {KINDS}")


@dataclasses.dataclass(frozen=True)
class Lineage:
    """What a downstream run measured: the encoder reference and, when it comes from a
    pre-training run, that run (id, name, experiment) and the checkpoint's step."""

    ref: str
    kind: str
    """resolve_encoder's ``info["kind"]``: checkpoint, export, mlflow-model, random, features."""
    run_id: str = ""
    run_name: str = ""
    experiment_id: str = ""
    step: int | None = None
    from_scratch: bool = False
    """Only the architecture is used (the supervised baseline): no pre-training run is claimed."""

    def tags(self) -> dict[str, str]:
        """The MLflow tags of a downstream run; only those that apply."""
        tags = {ENCODER_TAG: self.ref, ENCODER_KIND_TAG: self.kind}
        if self.from_scratch:
            return {**tags, ARCHITECTURE_FROM_TAG: self.ref}
        for name, value in ((PRETRAIN_RUN_TAG, self.run_id), (PRETRAIN_RUN_NAME_TAG, self.run_name),
                            (PRETRAIN_EXPERIMENT_TAG, self.experiment_id),
                            (CHECKPOINT_STEP_TAG, "" if self.step is None else str(self.step))):
            if value:
                tags[name] = value
        return tags


def lineage(ref: str, info: Mapping[str, Any] | None = None, *, tracking_uri: str = "",
            from_scratch: bool = False) -> Lineage:
    """The :class:`Lineage` of ``ref``; ``info`` is resolve_encoder's (resolved here when None).

    The pre-training run's name and experiment are looked up in ``tracking_uri``'s store; a
    run id that store does not know (a checkpoint from elsewhere) is kept without them.
    """
    ref = str(ref).strip()
    if ref == LOGMEL or ref.startswith(RANDOM_PREFIX):  # nothing trained: nothing to look up
        return Lineage(ref, "features" if ref == LOGMEL else "random", from_scratch=from_scratch)
    if info is None:
        _, info = resolve_encoder(ref, tracking_uri=tracking_uri)
    run_id, step = str(info.get("mlflow_run_id") or ""), info.get("step")
    name = experiment = ""
    if run_id:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient(tracking_uri=_tracking_uri(tracking_uri)).get_run(run_id)
            name, experiment = run.info.run_name or "", run.info.experiment_id
        except MlflowException:
            pass
    return Lineage(ref, str(info.get("kind") or ""), run_id, name, experiment,
                   None if step is None else int(step), from_scratch)


# ---- the kinds --------------------------------------------------------------------------

def _random(ref: str) -> tuple[WaveformEncoder, dict[str, Any]]:
    name = ref[len(RANDOM_PREFIX):]
    cfg = Config(model=ModelConfig(encoder=name, drop_path_rate=0.0))
    # A fixed seed makes the baseline the same network every time it is named.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        try:
            encoder = WaveformEncoder(cfg.features, cfg.model)
        except ValueError as e:
            raise EncoderNotFound(f"encoder reference {ref!r}: {e}") from e
    return encoder.eval(), _info(ref, "random", ref, cfg, encoder)


def _logmel(ref: str) -> tuple[LogMelStats, dict[str, Any]]:
    cfg = Config(model=ModelConfig(encoder=LOGMEL))
    encoder = LogMelStats(cfg.features)
    return encoder.eval(), _info(ref, "features", ref, cfg, encoder)


def _from_local(path: Path, ref: str, source: str = "") -> tuple[WaveformEncoder, dict[str, Any]]:
    source = source or str(path)
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    elif path.is_file() and path.name in (STATE_FILE, MODEL_FILE):
        path = path.parent
    if (path / CONFIG_FILE).is_file():
        encoder, config = load_export(path)
        cfg = Config.from_dict({"features": config["features"], "model": config["model"]})
        prov = config.get("provenance", {})
        cfg.data.segment_samples = config["segment_samples"]
        cfg.data.shards = prov.get("shards") or ""
        return encoder, _info(ref, "export", source, cfg, encoder,
                              run_id=prov.get("mlflow_run_id", ""), step=prov.get("step"))
    if (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file():
        state = read_state(path)
        cfg = Config.from_dict(state.config)
        with torch.random.fork_rng(devices=[]):
            encoder = load_checkpoint_encoder(path)  # safetensors weights; optimizer.pt untouched
        return encoder, _info(ref, "checkpoint", source, cfg, encoder, run_id=state.mlflow_run_id, step=state.step)
    raise EncoderNotFound(
        f"encoder reference {ref!r}: {source} holds neither {CONFIG_FILE} (an export) nor "
        f"{STATE_FILE} + {MODEL_FILE} (a checkpoint); {KINDS}"
    )


def _from_s3(ref: str) -> tuple[WaveformEncoder, dict[str, Any]]:
    url = ref.rstrip("/")
    if url.endswith("/" + CONFIG_FILE):
        url = url[: -len(CONFIG_FILE) - 1]
    try:
        names = {u.rsplit("/", 1)[1] for u in storage.list_files(url, suffix="")}
    except FileNotFoundError as e:
        raise EncoderNotFound(f"encoder reference {ref!r}: nothing found at {url}") from e
    if {CONFIG_FILE, WEIGHTS_FILE} <= names:
        wanted = [CONFIG_FILE, WEIGHTS_FILE]
    elif {STATE_FILE, MODEL_FILE} <= names:
        wanted = [STATE_FILE, MODEL_FILE]  # never optimizer.pt: not needed, and pickled
    else:
        raise EncoderNotFound(f"encoder reference {ref!r}: {url} is neither an export nor a checkpoint; {KINDS}")
    with tempfile.TemporaryDirectory(prefix="cola-encoder-") as tmp:
        for name in wanted:
            with storage.open_input(storage.join(url, name)) as src, open(Path(tmp) / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return _from_local(Path(tmp), ref, source=url)


def _from_run(run_id: str, uri: str) -> tuple[WaveformEncoder, dict[str, Any]]:
    """A run's latest checkpoint copied to MLflow, else the encoder it logged."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
        dirs = client.list_artifacts(run_id, "checkpoints")
    except MlflowException as e:
        raise EncoderNotFound(f"encoder reference {run_id!r}: no such MLflow run at {uri} ({e.message})") from e
    latest = _latest_checkpoint(dirs)
    if latest is not None:
        return _from_run_checkpoint(run_id, latest[1], run_id, uri)
    logged = run.data.tags.get(ENCODER_URI_TAG)
    if logged:
        encoder, info = _from_mlflow_model(logged, uri)
        return encoder, {**info, "ref": run_id}
    raise EncoderNotFound(
        f"encoder reference {run_id!r}: MLflow run has no checkpoints/ artifacts and no logged "
        f"encoder (tag {ENCODER_URI_TAG})"
    )


def _from_mlflow_uri(ref: str, uri: str) -> tuple[WaveformEncoder, dict[str, Any]]:
    if ref.startswith("runs:/"):
        run_id, _, path = ref[len("runs:/"):].partition("/")
        if path.rstrip("/").startswith("checkpoints/"):
            return _from_run_checkpoint(run_id, path.rstrip("/"), ref, uri)
    return _from_mlflow_model(ref, uri)


def _from_run_checkpoint(run_id: str, artifact_dir: str, ref: str, uri: str) -> tuple[WaveformEncoder, dict[str, Any]]:
    import mlflow
    from mlflow.exceptions import MlflowException

    source = f"runs:/{run_id}/{artifact_dir}"
    with tempfile.TemporaryDirectory(prefix="cola-encoder-") as tmp:
        for name in (STATE_FILE, MODEL_FILE):  # never optimizer.pt
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{artifact_dir}/{name}",
                                                    dst_path=tmp, tracking_uri=uri)
            except (MlflowException, OSError) as e:
                raise EncoderNotFound(f"encoder reference {ref!r}: cannot read {source}/{name} ({e})") from e
        found = list(Path(tmp).rglob(STATE_FILE))
        if not found:
            raise EncoderNotFound(f"encoder reference {ref!r}: no {STATE_FILE} under {source}")
        return _from_local(found[0].parent, ref, source=source)


def _from_mlflow_model(ref: str, uri: str) -> tuple[WaveformEncoder, dict[str, Any]]:
    """An MLflow pytorch model (pt2) -> a WaveformEncoder rebuilt from its run's config.

    The pt2 program itself is not returned: it is traced for one input length and one
    device. Its weights go into a WaveformEncoder built from the logging run's params,
    and one probe input must give the same embeddings from both, so a config that does not
    match the weights (the log-mel settings are not in the weights) is caught here.
    """
    import mlflow
    import mlflow.pytorch
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="cola-encoder-") as tmp:
        try:
            where = _model_location(MlflowClient(tracking_uri=uri, registry_uri=uri), ref)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=tmp,
                                                             tracking_uri=uri, registry_uri=uri))
        except (MlflowException, OSError) as e:
            raise EncoderNotFound(f"encoder reference {ref!r}: not found at {uri} ({e})") from e
        if not (local / "MLmodel").is_file():
            raise EncoderNotFound(f"encoder reference {ref!r}: not an MLflow model (no MLmodel file)")
        meta = yaml.safe_load((local / "MLmodel").read_text()) or {}
        data = local / (meta.get("flavors", {}).get("pytorch", {}).get("model_data") or "data")
        if not (data / "model.pt2").is_file():
            raise ValueError(
                f"encoder reference {ref!r}: not a pt2 (torch.export) pytorch model; pickled models "
                "are refused (re-log it with serialization_format='pt2')"
            )
        try:
            program = mlflow.pytorch.load_model(str(local))  # MLflow refuses pt2 archives holding pickle
        except MlflowException as e:
            raise ValueError(f"encoder reference {ref!r}: MLflow refused to load it: {e.message}") from e
    run_id = meta.get("run_id") or ""
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params if run_id else {}
    if "model.encoder" not in params:
        raise ValueError(
            f"encoder reference {ref!r}: its run {run_id or '(none)'} has no cola-ray params "
            "(model.encoder, features.*), so the encoder cannot be rebuilt from it"
        )
    cfg = _config_from_params(params)
    with torch.random.fork_rng(devices=[]):
        encoder = WaveformEncoder(cfg.features, cfg.model).eval()
    try:
        encoder.load_state_dict(program.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"encoder reference {ref!r}: its weights do not fit {cfg.model.encoder!r}: {e}") from e
    _check_same_output(program, encoder, cfg.data.segment_samples, ref)
    # The encoder is logged after the last checkpoint, so that checkpoint's step is its step.
    latest = _latest_checkpoint(MlflowClient(tracking_uri=uri).list_artifacts(run_id, "checkpoints"))
    return encoder, _info(ref, "mlflow-model", ref, cfg, encoder, run_id=run_id,
                          step=latest[0] if latest else None)


# ---- helpers ----------------------------------------------------------------------------

def _tracking_uri(uri: str) -> str:
    from cola_ray.train.tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri)


def _info(ref: str, kind: str, source: str, cfg: Config, encoder: WaveformEncoder, *,
          run_id: str = "", step: int | None = None) -> dict[str, Any]:
    return {
        "ref": ref,
        "kind": kind,
        "source": source,
        "encoder": cfg.model.encoder,
        "embedding_dim": int(encoder.embedding_dim),
        "sample_rate": int(cfg.features.sample_rate),
        "segment_samples": int(cfg.data.segment_samples),
        "features": dataclasses.asdict(cfg.features),
        "model": dataclasses.asdict(cfg.model),
        "mlflow_run_id": run_id or "",
        "step": step,
        "shards": cfg.data.shards,
    }


def _config_from_params(params: Mapping[str, str]) -> Config:
    """The data/features/model sections of a Config from a run's MLflow params (strings)."""
    sections: dict[str, dict[str, Any]] = {}
    for section, cls in (("data", DataConfig), ("features", FeatureConfig), ("model", ModelConfig)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            raw = params.get(f"{section}.{f.name}")
            if raw is not None:
                sections.setdefault(section, {})[f.name] = _parse_param(hints[f.name], raw)
    return Config.from_dict(sections)


def _parse_param(tp: Any, raw: str) -> Any:
    # Params were logged as str(value) (dicts as JSON) by tracking.start_or_resume_run.
    if tp is bool:
        return {"True": True, "False": False}.get(raw, raw)
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    if typing.get_origin(tp) is dict:
        return json.loads(raw)
    return raw


def _check_same_output(program: torch.nn.Module, encoder: WaveformEncoder, n_samples: int, ref: str) -> None:
    wave = torch.randn(2, n_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        want, got = program(wave), encoder(wave)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
        raise ValueError(
            f"encoder reference {ref!r}: the model rebuilt from its run's params does not reproduce "
            "the logged model's embeddings (the run's features/model params differ from the weights')"
        )


def _model_location(client: Any, ref: str) -> str:
    """Where the files of an MLflow model are, looked up with ``client``.

    MLflow's own ``models:/`` download (also used for ``runs:/<id>/<name>`` when the name is
    a logged model) looks models up with the process-wide registry URI, whatever URI it is
    given; resolving both here keeps every lookup on ``client``'s tracking server.
    """
    if ref.startswith("runs:/"):
        run_id, _, path = ref[len("runs:/"):].strip("/").partition("/")
        name = path.split("/", 1)[0]
        experiment = client.get_run(run_id).info.experiment_id
        # MLflow 3: a model logged in a run lives outside the run's artifacts.
        found = client.search_logged_models(
            experiment_ids=[experiment], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1,
        )
        if found:
            return found[0].artifact_location
        return ref  # an MLflow 2 style model inside the run's artifacts
    head = ref[len("models:/"):].strip("/").split("/")
    if head[0].startswith("m-"):  # a logged model id
        return client.get_logged_model(head[0]).artifact_location
    if "@" in head[0]:
        name, alias = head[0].split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = head[0], head[1] if len(head) > 1 else ""
        if number == "latest":
            found = client.search_model_versions(f"name = '{name}'")
            number = str(max((int(v.version) for v in found), default=0))
        if not number.isdigit() or number == "0":
            raise EncoderNotFound(f"encoder reference {ref!r}: expected models:/<name>/<version>, "
                                  "models:/<name>@<alias> or models:/m-<id>")
        version = client.get_model_version(name, number)
    if getattr(version, "model_id", None):  # MLflow 3: a version points at a logged model
        return client.get_logged_model(version.model_id).artifact_location
    return client.get_model_version_download_uri(version.name, version.version)


def _latest_checkpoint(artifacts: list[Any]) -> tuple[int, str] | None:
    """``(step, artifact path)`` of the newest ``checkpoints/checkpoint_<step>`` folder."""
    found = []
    for a in artifacts:
        m = _CHECKPOINT_DIR.fullmatch(a.path.rsplit("/", 1)[-1])
        if a.is_dir and m:
            found.append((int(m.group(1)), a.path))
    return max(found) if found else None
