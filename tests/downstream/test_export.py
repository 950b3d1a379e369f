"""Encoder exports (cola_ray.downstream.export), --encoder references (cola_ray.downstream.encoders), the registry.

Fast tests build a tiny WaveformEncoder (test_efficientnet) directly. The slow ones share
ONE tiny training run (module fixture) that registers its encoder in the Model Registry.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cola_ray.data import storage
from helpers import paths
from cola_ray.train.checkpoint import TrainState, load_encoder as load_checkpoint_encoder, save_checkpoint
from cola_ray.config import Config, FeatureConfig, ModelConfig
from cola_ray.model.encoder import WaveformEncoder
from cola_ray.downstream.encoders import EncoderNotFound, resolve_encoder
from cola_ray.downstream.export import CONFIG_FILE, FORMAT, WEIGHTS_FILE, ExportError, export_encoder, load_encoder

MODEL = ModelConfig(encoder="test_efficientnet", drop_path_rate=0.0)
CLI = str(paths.CLI)


def waves(n: int = 3, samples: int = 15600, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def embed(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = WaveformEncoder(FeatureConfig(), MODEL).eval()
    with torch.no_grad():  # non-trivial BN statistics: a loader that lost them would show
        for name, buf in enc.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return enc


@pytest.fixture
def export_dir(encoder, tmp_path):
    return export_encoder(encoder, {"model": MODEL, "ref": "in-memory", "step": 3}, tmp_path / "export")


@pytest.fixture
def checkpoint_dir(tmp_path):
    from cola_ray.model.cola import ColaModel

    cfg = Config(model=MODEL)
    cfg.data.shards = "/data/shards"
    torch.manual_seed(1)
    model = ColaModel(cfg.features, cfg.model)
    state = TrainState(step=7, global_batch=8, mlflow_run_id="abc123", config=cfg.to_dict())
    return save_checkpoint(tmp_path / "checkpoint_000000007", model, torch.optim.Adam(model.parameters()), state)


# ---- export round trip ----------------------------------------------------------------------

def test_export_round_trip_gives_the_same_embeddings(encoder, export_dir):
    loaded = load_encoder(export_dir)
    assert isinstance(loaded, WaveformEncoder) and not loaded.training
    for samples in (15600, 24000):
        x = waves(samples=samples)
        assert torch.equal(embed(loaded, x), embed(encoder, x))
    assert torch.equal(embed(load_encoder(export_dir / CONFIG_FILE), waves()), embed(encoder, waves()))
    assert sorted(p.name for p in export_dir.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_config_json_describes_the_encoder(encoder, export_dir):
    config = json.loads((export_dir / CONFIG_FILE).read_text())
    assert config["format"] == FORMAT
    assert config["encoder"] == "test_efficientnet" == config["model"]["encoder"]
    assert config["embedding_dim"] == encoder.embedding_dim
    assert config["sample_rate"] == 16000 and config["segment_samples"] == 15600
    assert config["features"]["n_mels"] == 64 and config["features"]["hop_length"] == 160
    assert config["weights_sha256"] == hashlib.sha256((export_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    prov = config["provenance"]
    assert prov["ref"] == "in-memory" and prov["step"] == 3
    assert {"exported_at", "torch_version", "timm_version"} <= set(prov)


def test_export_does_not_overwrite_by_accident(encoder, export_dir):
    with pytest.raises(FileExistsError):
        export_encoder(encoder, {"model": MODEL}, export_dir)
    export_encoder(encoder, {"model": MODEL}, export_dir, overwrite=True)
    with pytest.raises(ValueError, match="model"):
        export_encoder(encoder, {}, export_dir, overwrite=True)


@pytest.mark.slow  # a subprocess
def test_import_cola_ray_stays_light_and_load_encoder_is_lazy(export_dir):
    code = (
        "import sys, cola_ray\n"
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules and 'ray' not in sys.modules\n"
        f"enc = cola_ray.load_encoder({str(export_dir)!r})\n"
        "assert 'ray' not in sys.modules and 'mlflow' not in sys.modules, 'loading needs no Ray or MLflow'\n"
        "print(enc.embedding_dim)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().isdigit()


def test_loading_leaves_the_callers_rng_alone(export_dir):
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    load_encoder(export_dir)
    assert torch.equal(torch.rand(3), want)


# ---- tampered exports ---------------------------------------------------------------------------

def _rehash(folder: Path) -> None:
    """What an attacker who edits the weights would also do: fix the recorded hash."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _flip_byte(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0x01  # inside the tensor data, after the header
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))


def _rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    _rehash(folder)


TAMPERING = {
    "flipped-byte": (_flip_byte, WEIGHTS_FILE, "sha256"),
    "edited-hash": (lambda f: _edit_config(f, weights_sha256="0" * 64), WEIGHTS_FILE, "does not match"),
    "dropped-tensor": (lambda f: _rewrite_tensors(f, lambda t: t.pop("backbone.conv_head.weight")),
                       WEIGHTS_FILE, "missing tensor.*backbone.conv_head.weight"),
    "extra-tensor": (lambda f: _rewrite_tensors(f, lambda t: t.update(extra=torch.zeros(2))),
                     WEIGHTS_FILE, "unexpected tensor.*extra"),
    "wrong-shape": (lambda f: _rewrite_tensors(f, lambda t: t.update({"backbone.conv_stem.weight": torch.zeros(24, 1, 5, 5)})),
                    WEIGHTS_FILE, "backbone.conv_stem.weight.*24, 1, 5, 5"),
    "wrong-dtype": (lambda f: _rewrite_tensors(f, lambda t: t.update({"backbone.bn1.weight": t["backbone.bn1.weight"].double()})),
                    WEIGHTS_FILE, "backbone.bn1.weight.*float64"),
    "unknown-format": (lambda f: _edit_config(f, format="cola-ray-encoder/99"), CONFIG_FILE, "unknown export format"),
    "not-json": (lambda f: (f / CONFIG_FILE).write_text("{nope"), CONFIG_FILE, "not valid JSON"),
    "unknown-config-key": (lambda f: _edit_config(f, features={"n_mels": 64, "bogus": 1}), CONFIG_FILE, "bogus"),
    "other-architecture": (lambda f: _edit_config(f, encoder="resnet18", model={**MODEL.__dict__, "encoder": "resnet18"}),
                           WEIGHTS_FILE, "missing tensor"),
    "missing-weights": (lambda f: (f / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "missing"),
    "not-safetensors": (lambda f: ((f / WEIGHTS_FILE).write_bytes(b"\x80\x04garbage"), _rehash(f)),
                        WEIGHTS_FILE, "not a readable safetensors"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampered_export_is_refused_naming_the_file(export_dir, how):
    tamper, file_name, needle = TAMPERING[how]
    tamper(export_dir)
    with pytest.raises(ExportError, match=needle) as err:
        load_encoder(export_dir)
    assert str(export_dir / file_name) in str(err.value)


def test_a_pickle_posing_as_weights_never_runs(export_dir, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (export_dir / WEIGHTS_FILE).write_bytes(pickle.dumps(Payload()))
    _rehash(export_dir)
    with pytest.raises(ExportError, match=WEIGHTS_FILE):
        load_encoder(export_dir)
    assert not marker.exists()


# ---- resolve_encoder: every kind of reference ----------------------------------------------------

def test_resolve_checkpoint_folder_and_its_files(checkpoint_dir):
    want = embed(load_checkpoint_encoder(checkpoint_dir), waves())
    for ref in (str(checkpoint_dir), str(checkpoint_dir / "state.json"), f"file://{checkpoint_dir}"):
        encoder, info = resolve_encoder(ref)
        assert not encoder.training and torch.equal(embed(encoder, waves()), want), ref
        assert info["kind"] == "checkpoint" and info["ref"] == ref
        assert info["step"] == 7 and info["mlflow_run_id"] == "abc123" and info["shards"] == "/data/shards"
        assert info["encoder"] == "test_efficientnet" and info["embedding_dim"] == encoder.embedding_dim


def test_resolve_export_folder_and_config_json(encoder, export_dir):
    for ref in (str(export_dir), str(export_dir / CONFIG_FILE)):
        resolved, info = resolve_encoder(ref)
        assert torch.equal(embed(resolved, waves()), embed(encoder, waves()))
        assert info["kind"] == "export" and info["step"] == 3


def test_resolve_random_baseline_is_reproducible():
    a, info = resolve_encoder("random:test_efficientnet")
    b, _ = resolve_encoder("random:test_efficientnet")
    assert info["kind"] == "random" and info["features"] == FeatureConfig().__dict__
    assert torch.equal(embed(a, waves()), embed(b, waves()))


def test_checkpoint_to_export_round_trip(checkpoint_dir, tmp_path):
    encoder, info = resolve_encoder(str(checkpoint_dir))
    out = export_encoder(encoder, info, tmp_path / "exported")
    assert torch.equal(embed(load_encoder(out), waves()), embed(encoder, waves()))
    prov = json.loads((out / CONFIG_FILE).read_text())["provenance"]
    assert prov["kind"] == "checkpoint" and prov["step"] == 7 and prov["mlflow_run_id"] == "abc123"
    assert prov["shards"] == "/data/shards" and prov["ref"] == str(checkpoint_dir)


@pytest.mark.parametrize("ref", [
    "no/such/folder", "0123456789abcdef0123456789abcdef", "random:not_a_timm_model",
    "models:/no-such-model/1", "runs:/0123456789abcdef0123456789abcdef/encoder", "EMPTY-FOLDER",
])
def test_unknown_reference_fails_naming_it(ref, tmp_path):
    if ref == "EMPTY-FOLDER":
        ref = str(tmp_path / "empty")
        Path(ref).mkdir()
    with pytest.raises(EncoderNotFound) as err:
        resolve_encoder(ref, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert repr(ref) in str(err.value)


def test_empty_reference_lists_what_is_accepted():
    with pytest.raises(EncoderNotFound, match="models:/<name>/<version>.*random:"):
        resolve_encoder("  ")


@pytest.mark.slow  # a subprocess
def test_cli_export(checkpoint_dir, tmp_path):
    out = tmp_path / "cli-export"
    done = subprocess.run([CLI, "export", "--encoder", str(checkpoint_dir), str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    assert torch.equal(embed(load_encoder(out), waves()), embed(load_checkpoint_encoder(checkpoint_dir), waves()))
    bad = subprocess.run([CLI, "export", "--encoder", str(tmp_path / "missing"), str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode == 2 and "missing" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_resolve_checkpoint_and_export_on_s3(s3_bucket, checkpoint_dir, encoder, export_dir):
    for folder, prefix in ((checkpoint_dir, "runs/a/checkpoint_000000007"), (export_dir, "exports/e")):
        for f in folder.iterdir():
            storage.upload_file(f, f"{s3_bucket}/{prefix}/{f.name}")
    resolved, info = resolve_encoder(f"{s3_bucket}/runs/a/checkpoint_000000007/")
    assert info["kind"] == "checkpoint" and info["step"] == 7
    assert torch.equal(embed(resolved, waves()), embed(load_checkpoint_encoder(checkpoint_dir), waves()))
    resolved, info = resolve_encoder(f"{s3_bucket}/exports/e/config.json")
    assert info["kind"] == "export" and torch.equal(embed(resolved, waves()), embed(encoder, waves()))
    with pytest.raises(EncoderNotFound, match="exports/nothing"):
        resolve_encoder(f"{s3_bucket}/exports/nothing")


# ---- one tiny training run: registry, MLflow references, train -> export -> load ---------------

REGISTERED = "cola-test-encoder"


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    from helpers.factories import make_shards
    from cola_ray.config import load_config
    from cola_ray.train.trainer import fit

    root = tmp_path_factory.mktemp("trained")
    make_shards(root, n_clips=24, seconds=2.0, seed=5, max_samples=8, labels=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(None, [
        f"data.shards={root / 'shards'}", "data.shuffle_buffer=16", "data.decode_num_cpus=0.5",
        "model.encoder=test_efficientnet", "model.drop_path_rate=0.0", "model.proj_dim=32",
        "train.batch_size=8", "train.num_workers=1", "train.cpus_per_worker=1", "train.lr=0.002",
        "train.max_steps=4", "train.log_every_steps=2", "train.checkpoint_every_steps=2",
        "train.max_failures=0", "name=registry-run", f"storage_path={root / 'runs'}",
        f"tracking.tracking_uri={uri}", "tracking.experiment=test-export",
        f"tracking.registered_model_name={REGISTERED}",
    ])
    result = fit(cfg, echo=lambda *_: None)
    reference = load_checkpoint_encoder(result.checkpoint)  # the trained weights, in memory
    return result, reference


@pytest.mark.slow
def test_registered_model_loads_with_mlflow_and_takes_any_batch(trained):
    import importlib.metadata

    import mlflow
    import mlflow.artifacts
    import mlflow.pytorch

    result, reference = trained
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(result.tracking_uri)
    try:
        program = mlflow.pytorch.load_model(f"models:/{REGISTERED}/1")
        requirements = mlflow.artifacts.download_artifacts(f"models:/{REGISTERED}/1/requirements.txt")
    finally:
        mlflow.set_tracking_uri(previous)
    # MLflow 3 logs pt2: a torch.export program, unlifted to an fx GraphModule.
    assert isinstance(program, torch.fx.GraphModule)
    for batch in (1, 3, 5):
        x = waves(batch)
        assert close(embed(program, x), embed(reference, x)), batch
    # Its environment is stated (not inferred in a subprocess): what loading it imports, pinned.
    with open(requirements) as f:
        pins = set(f.read().split())
    assert f"torch=={importlib.metadata.version('torch').split('+')[0]}" in pins, pins
    assert any(p.startswith("mlflow==") for p in pins) and any(p.startswith("numpy==") for p in pins), pins


@pytest.mark.slow
def test_every_mlflow_reference_resolves_to_the_trained_encoder(trained):
    from mlflow.tracking import MlflowClient

    result, reference = trained
    run_id = result.mlflow_run_id
    client = MlflowClient(result.tracking_uri)
    tags = client.get_run(run_id).data.tags
    client.set_registered_model_alias(REGISTERED, "prod", "1")
    refs = {
        run_id: "checkpoint",
        f"models:/{REGISTERED}/1": "mlflow-model",
        f"models:/{REGISTERED}@prod": "mlflow-model",
        f"models:/{REGISTERED}/latest": "mlflow-model",
        tags["cola_ray.encoder_uri"]: "mlflow-model",  # models:/m-<id>
        f"runs:/{run_id}/encoder": "mlflow-model",
        f"runs:/{run_id}/checkpoints/checkpoint_000000002": "checkpoint",
        result.checkpoint: "checkpoint",
    }
    want = embed(reference, waves(2, 20000))
    for ref, kind in refs.items():
        encoder, info = resolve_encoder(ref, tracking_uri=result.tracking_uri)
        assert isinstance(encoder, WaveformEncoder) and not encoder.training, ref
        assert info["kind"] == kind and info["mlflow_run_id"] == run_id, (ref, info)
        if ref.endswith("checkpoint_000000002"):
            assert info["step"] == 2
            continue
        assert info["step"] == 4, (ref, info)
        assert close(embed(encoder, waves(2, 20000)), want), ref  # any length: not the traced program
    with pytest.raises(EncoderNotFound, match=f"models:/{REGISTERED}/9"):
        resolve_encoder(f"models:/{REGISTERED}/9", tracking_uri=result.tracking_uri)


@pytest.mark.slow
def test_train_register_export_load_round_trip(trained, tmp_path):
    from cola_ray.downstream import hear

    result, reference = trained
    encoder, info = resolve_encoder(f"models:/{REGISTERED}/1", tracking_uri=result.tracking_uri)
    out = export_encoder(encoder, info, tmp_path / "export")
    loaded = load_encoder(out)
    x = waves(4)
    assert close(embed(loaded, x), embed(reference, x))
    prov = json.loads((out / CONFIG_FILE).read_text())["provenance"]
    assert prov["mlflow_run_id"] == result.mlflow_run_id and prov["step"] == 4
    assert prov["ref"] == f"models:/{REGISTERED}/1" and prov["shards"].endswith("shards")
    model = hear.load_model(str(out))
    scene = hear.get_scene_embeddings(x, model)
    assert scene.shape == (4, reference.embedding_dim) and torch.isfinite(scene).all()


@pytest.mark.slow
def test_a_pickled_mlflow_model_is_refused(trained):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    result, reference = trained
    experiment = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).info.experiment_id
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(result.tracking_uri)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.pytorch.log_model(reference, name="pickled", serialization_format="pickle")
    finally:
        mlflow.set_tracking_uri(previous)
    with pytest.raises(ValueError, match="pickled models are refused"):
        resolve_encoder(f"runs:/{run.info.run_id}/pickled", tracking_uri=result.tracking_uri)

