"""The `cola-ray` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import subprocess

import pytest

from cola_ray.data import synthetic
from helpers import paths

CLI = [str(paths.CLI)]


def run(*args, timeout=120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_shards_build_then_verify_then_detect_damage(tmp_path):
    labels = synthetic.make_corpus(tmp_path / "clips", n_clips=12, seconds=1.5, seed=3)
    out = tmp_path / "shards"
    built = run("shards", "build", tmp_path / "clips", out, "--labels", labels, "--max-samples", 5, "--no-progress")
    assert built.returncode == 0, built.stderr
    assert "3 shards, 12 samples" in built.stdout
    ok = run("shards", "verify", out)
    assert ok.returncode == 0 and "OK" in ok.stdout
    victim = sorted(out.glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:-3000])
    bad = run("shards", "verify", out)
    assert bad.returncode == 1
    assert victim.name in bad.stdout


@pytest.mark.parametrize("override, needle", [("train.lrr=1", "train.lrr"), ("model.similarity=dot", "model.similarity")])
def test_pretrain_rejects_bad_config_before_any_work(tmp_path, override, needle):
    result = run("pretrain", f"storage_path={tmp_path}", override, timeout=60)
    assert result.returncode == 2
    assert needle in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may start before the config is valid"


def test_pretrain_names_a_missing_shard_path(tmp_path):
    result = run("pretrain", f"data.shards={tmp_path / 'no-such-shards'}", f"storage_path={tmp_path / 'runs'}",
                 "train.batch_size=8", "ray_address=127.0.0.1:1", timeout=60)
    assert result.returncode != 0
    assert "no-such-shards" in result.stderr
