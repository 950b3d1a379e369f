"""Config: YAML + overrides, unknown keys and wrong types fail naming the key."""

from __future__ import annotations

import pytest
import yaml

from cola_ray.config import Config, ConfigError, load_config, n_frames
from cola_ray.demo import DEMO_OVERRIDES
from helpers.paths import CONFIGS


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.model.encoder == "efficientnet_b0" and cfg.model.similarity == "bilinear"
    assert cfg.train.lr == 1e-4 and cfg.model.proj_dim == 512
    assert (cfg.features.n_mels, cfg.features.f_min, cfg.features.f_max) == (64, 60.0, 7800.0)
    assert n_frames(cfg.features, cfg.data.segment_samples) == 96


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 8, "num_workers": 2}, "model": {"encoder": "x"}}))
    cfg = load_config(path, ["train.lr=3e-4", "resume=true", "data.decode_resources={decode-node: 0.5}"])
    assert cfg.train.lr == 3e-4 and cfg.resume is True and cfg.per_worker_batch == 4
    assert cfg.data.decode_resources == {"decode-node": 0.5}
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["train.lr"] == 3e-4


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "train.lrr"),
    ("trian.lr=1", "trian"),
    ("train.lr=fast", "train.lr"),
    ("train.num_workers=1.5", "train.num_workers"),
    ("resume=maybe", "resume"),
    ("model.similarity=dot", "model.similarity"),
    ("train.batch_size=7", "train.batch_size"),
    ("nonsense", "nonsense"),
    ("train.compile=fast", "train.compile"),
    ("data.block_pairs=0", "data.block_pairs"),
    ("train.prefetch_batches=-1", "train.prefetch_batches"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, ["train.num_workers=2", "train.batch_size=8", override])


def test_env_references(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("storage_path: ${COLA_T_STORE:-/tmp/x}\ntrain:\n  max_steps: ${COLA_T_STEPS}\n")
    monkeypatch.setenv("COLA_T_STEPS", "7")
    cfg = load_config(path)
    assert cfg.storage_path == "/tmp/x" and cfg.train.max_steps == 7
    monkeypatch.delenv("COLA_T_STEPS")
    with pytest.raises(ConfigError, match="COLA_T_STEPS"):
        load_config(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["paper", "smoke", "demo", "laptop"])
def test_shipped_job_configs_load(name, monkeypatch):
    for var in ("COLA_RUN_NAME", "COLA_STORAGE_PATH", "COLA_SHARDS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(CONFIGS / f"{name}.yaml")
    if name == "paper":
        assert cfg.model.encoder == "efficientnet_b0" and cfg.train.batch_size == 1024
        assert cfg.train.lr == 1e-4 and cfg.model.similarity == "bilinear"


def test_demo_yaml_matches_the_demo_command():
    """jobs/configs/demo.yaml is what `cola-ray demo` runs: they must not drift apart."""
    cfg = load_config(CONFIGS / "demo.yaml").flat()
    for item in DEMO_OVERRIDES:
        key, _, value = item.partition("=")
        assert cfg[key] == yaml.safe_load(value), key
