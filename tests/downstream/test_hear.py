"""The HEAR 2021 API (cola_ray.downstream.hear) over an export of a tiny encoder.

The first tests mirror hearvalidator's checks; the last ones run the real validator
(``pip install --no-deps hearvalidator``: it declares tensorflow, which it only needs for
TensorFlow models, so tests/helpers/stubs/tensorflow stands in for it when it is missing).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from cola_ray.downstream import hear
from cola_ray.config import FeatureConfig, ModelConfig
from cola_ray.model.encoder import WaveformEncoder
from cola_ray.downstream.export import export_encoder

SR = 16000
MODEL = ModelConfig(encoder="test_efficientnet", drop_path_rate=0.0)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    encoder = WaveformEncoder(FeatureConfig(), MODEL).eval()
    return export_encoder(encoder, {"model": MODEL}, tmp_path_factory.mktemp("hear") / "export")


@pytest.fixture(scope="module")
def model(export_dir):
    return hear.load_model(str(export_dir))


def noise(n_sounds: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """White noise in [-1, 1], as hearvalidator makes it."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_sounds, int(seconds * SR), generator=g) * 2 - 1


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Different batch sizes may take different conv kernels: equal up to float rounding.
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


# ---- hearvalidator's checks --------------------------------------------------------------

def test_load_model_and_attributes(model, export_dir):
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000 and isinstance(model.sample_rate, int)
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    assert model.scene_embedding_size == model.timestamp_embedding_size == model.encoder.embedding_dim
    assert hear.load_model(str(export_dir / "config.json")).scene_embedding_size == model.scene_embedding_size


def test_load_model_without_a_path_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="cola-ray export --encoder"):
        hear.load_model()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hear.load_model(str(tmp_path / "nowhere"))


def test_timestamp_embeddings_as_the_validator_checks_them(model):
    audio = noise(16, 2.0)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32
    assert embeddings.shape == (16, 1 + 32000 // 800, model.timestamp_embedding_size)
    assert timestamps.shape == embeddings.shape[:2]
    diff = torch.diff(timestamps)
    assert float(diff.mean()) <= 50.0
    assert torch.all((diff - diff.mean()).abs() < 1e-3), "regular intervals"
    assert torch.isfinite(embeddings).all()


def test_scene_embeddings_as_the_validator_checks_them(model):
    audio = noise(8, 3.74)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.dtype == torch.float32 and scene.shape == (8, model.scene_embedding_size)
    # Documented choice: the mean of the timestamp embeddings.
    short = audio[:2, :16000]
    assert close(hear.get_scene_embeddings(short, model), hear.get_timestamp_embeddings(short, model)[0].mean(dim=1))


# ---- timestamps and windows ---------------------------------------------------------------

def test_timestamps_are_milliseconds_from_zero_and_monotonic(model):
    _, timestamps = hear.get_timestamp_embeddings(noise(2, 1.23), model)
    n = 1 + int(1.23 * SR) // 800
    expected = torch.arange(n, dtype=torch.float32) * 50.0
    assert timestamps.dtype == torch.float32
    assert torch.equal(timestamps, expected.expand(2, n))
    assert bool((torch.diff(timestamps) > 0).all())


def test_windows_are_centred_on_their_timestamps(model):
    audio = noise(1, 1.5, seed=3)
    embeddings, _ = hear.get_timestamp_embeddings(audio, model)
    w, hop = model.window_samples, model.hop_samples
    assert w == 15600 and hop == 800
    padded = torch.cat([torch.zeros(1, w // 2), audio, torch.zeros(1, w - w // 2)], dim=1)
    for k in (0, 7, embeddings.shape[1] - 1):
        centre = k * hop  # in the clip; window [centre - w/2, centre + w/2), zeros outside
        window = padded[:, centre : centre + w]
        with torch.no_grad():
            direct = model.encoder(window)
        assert close(embeddings[:, k], direct), k


@pytest.mark.parametrize("hop_ms, hop_samples", [(25.0, 400), (10.0, 160)])
def test_hop_is_configurable(export_dir, hop_ms, hop_samples):
    m = hear.load_model(str(export_dir), hop_ms=hop_ms)
    _, ts = hear.get_timestamp_embeddings(noise(1, 0.5), m)
    assert m.hop_samples == hop_samples and ts.shape[1] == 1 + 8000 // hop_samples
    assert torch.allclose(torch.diff(ts), torch.full_like(ts[:, 1:], hop_ms))


# ---- contract: determinism, independence, padding --------------------------------------------

def test_deterministic_and_always_in_eval_mode(model):
    audio = noise(2, 1.0, seed=1)
    model.train()  # ignored: inference only
    assert not model.training and not model.encoder.training
    a, _ = hear.get_timestamp_embeddings(audio, model)
    b, _ = hear.get_timestamp_embeddings(audio, model)
    assert torch.equal(a, b)


def test_an_embedding_does_not_depend_on_the_rest_of_the_batch(model):
    audio = noise(3, 1.0, seed=2)
    together, _ = hear.get_timestamp_embeddings(audio, model)
    for i in range(3):
        alone, _ = hear.get_timestamp_embeddings(audio[i : i + 1], model)
        assert close(together[i], alone[0]), i
    # Nor on how many windows go through the encoder at once.
    one_at_a_time = hear.HearModel(model.encoder, model.window_samples, max_windows=1)
    assert close(hear.get_timestamp_embeddings(audio, one_at_a_time)[0], together)


@pytest.mark.parametrize("seconds, padded_to", [(1.0, 2.0), (0.1, 0.5), (1.7, 1.75)])
def test_zero_padding_a_clip_keeps_its_embeddings(model, seconds, padded_to):
    """A clip batched with longer ones (zero-padded) keeps the embeddings of its timestamps."""
    clip = noise(1, seconds, seed=4)
    padded = torch.nn.functional.pad(clip, (0, int(padded_to * SR) - clip.shape[1]))
    short, ts_short = hear.get_timestamp_embeddings(clip, model)
    long, ts_long = hear.get_timestamp_embeddings(padded, model)
    n = short.shape[1]
    assert torch.equal(ts_long[:, :n], ts_short)
    assert close(long[:, :n], short)


@pytest.mark.parametrize("n_samples, n_timestamps", [(1, 1), (400, 1), (1600, 3), (15599, 20)])
def test_clips_shorter_than_one_window_are_padded(model, n_samples, n_timestamps):
    embeddings, timestamps = hear.get_timestamp_embeddings(noise(2, n_samples / SR), model)
    assert embeddings.shape == (2, n_timestamps, model.timestamp_embedding_size)
    assert torch.isfinite(embeddings).all()
    assert hear.get_scene_embeddings(noise(2, n_samples / SR), model).shape == (2, model.scene_embedding_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_give_float32(model, dtype):
    audio = noise(1, 0.5)
    emb, ts = hear.get_timestamp_embeddings(audio.to(dtype), model)
    assert emb.dtype == torch.float32 and ts.dtype == torch.float32
    if dtype == torch.float64:
        assert close(emb, hear.get_timestamp_embeddings(audio, model)[0])


@pytest.mark.parametrize("audio, needle", [
    (torch.zeros(16000), "shape"),
    (torch.zeros(1, 1, 16000), "shape"),
    (torch.zeros(2, 16000, dtype=torch.int16), "dtype"),
    (torch.zeros(0, 16000), "n_sounds >= 1"),
    (torch.zeros(2, 0), "n_samples >= 1"),
    (torch.tensor([[0.0, float("nan"), 0.1] * 1000]), "NaN"),
    (torch.tensor([[0.0, float("inf")] * 1000]), "infinite"),
    (np.zeros((2, 16000), dtype=np.float32), "ndarray"),
], ids=["1d", "3d", "int16", "empty-batch", "empty-clip", "nan", "inf", "numpy"])
def test_bad_input_says_what_was_expected(model, audio, needle):
    with pytest.raises(ValueError, match=r"\(n_sounds, n_samples\)") as err:
        hear.get_timestamp_embeddings(audio, model)
    assert needle in str(err.value)
    with pytest.raises(ValueError):
        hear.get_scene_embeddings(audio, model)


# ---- devices --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_model_and_tensors(export_dir):
    cpu_model = hear.load_model(str(export_dir))
    gpu_model = hear.load_model(str(export_dir)).to("cuda")
    audio = noise(3, 1.0)
    want, ts_want = hear.get_timestamp_embeddings(audio, cpu_model)
    got, ts = hear.get_timestamp_embeddings(audio.cuda(), gpu_model)
    assert got.device.type == "cuda" and ts.device.type == "cuda"
    assert torch.allclose(got.cpu(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert torch.equal(ts.cpu(), ts_want)
    scene = hear.get_scene_embeddings(audio.cuda(), gpu_model)
    assert scene.device.type == "cuda" and scene.shape == (3, gpu_model.scene_embedding_size)
    # CPU audio into a GPU model: computed on the GPU, returned on the CPU.
    assert hear.get_timestamp_embeddings(audio, gpu_model)[0].device.type == "cpu"


# ---- the real validator, when installed ---------------------------------------------------------

def hearvalidator(monkeypatch) -> types.ModuleType:
    """``hearvalidator.validate``, imported afresh for one test and kept out of sys.modules;
    with the tensorflow stand-in (tests/helpers/stubs/tensorflow) when tensorflow is missing."""
    pytest.importorskip("hearvalidator", reason="pip install --no-deps hearvalidator==2021.0.2 (see pyproject.toml)")
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        from helpers.stubs import tensorflow as stub

        monkeypatch.setitem(sys.modules, "tensorflow", stub)
    spec = importlib.util.find_spec("hearvalidator.validate")
    validate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate)
    return validate


def test_hearvalidator_accepts_the_module(export_dir, monkeypatch):
    """The validator: load_model(path) gives a torch Module with an accepted int sample_rate
    and int embedding sizes; 16 x 2 s of noise -> float32 (16, T, timestamp_embedding_size)
    embeddings with (16, T) timestamps at regular intervals; 8 x 3.74 s -> float32
    (8, scene_embedding_size) scene embeddings. Any failure raises its ModelError."""
    validate = hearvalidator(monkeypatch)
    checker = validate.ValidateModel("cola_ray.downstream.hear", str(export_dir), device="cpu")
    checker()
    assert checker.model_type == "torch"  # checked as a torch model, the stand-in's tf.Module never matches
    assert checker.model.scene_embedding_size == hear.load_model(str(export_dir)).encoder.embedding_dim


def _irregular_timestamps(audio, model):
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    timestamps = timestamps.clone()
    timestamps[:, -1] -= 5.0  # the last interval 45 ms, the others 50
    return embeddings, timestamps


@pytest.mark.parametrize("get_timestamp_embeddings, message", [
    (lambda audio, model: (hear.get_timestamp_embeddings(audio, model)[0].double(),
                           hear.get_timestamp_embeddings(audio, model)[1]), "Expected embeddings to be torch.float32"),
    (_irregular_timestamps, "Timestamps should occur at regular intervals"),
], ids=["float64-embeddings", "irregular-timestamps"])
def test_hearvalidator_refuses_a_module_that_breaks_the_api(export_dir, monkeypatch, get_timestamp_embeddings,
                                                             message):
    """The validator run above can fail: the same module with one contract broken is refused."""
    validate = hearvalidator(monkeypatch)
    broken = types.ModuleType("broken_hear")
    broken.load_model = hear.load_model
    broken.get_scene_embeddings = hear.get_scene_embeddings
    broken.get_timestamp_embeddings = get_timestamp_embeddings
    monkeypatch.setitem(sys.modules, "broken_hear", broken)
    with pytest.raises(validate.ModelError, match=message):
        validate.ValidateModel("broken_hear", str(export_dir), device="cpu")()
