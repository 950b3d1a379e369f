"""The `cola-ray` command: its parser, help and exit codes in-process (``cli.main(argv)``, fast),
and as a user runs it (a real subprocess, slow)."""

from __future__ import annotations

import argparse
import re
import subprocess
from importlib import metadata

import pytest

from cola_ray import cli
from cola_ray.data import synthetic
from helpers import paths

CLI = [str(paths.CLI)]


# ---- in-process: parser, help, exit codes ---------------------------------------------

def parsers(parser: argparse.ArgumentParser, name: str = "cola-ray"):
    """``(command line, parser)`` for the top level and every command and subcommand."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


ALL = list(parsers(cli.build_parser()))
RST = re.compile(r"``|:[a-z]+:`|`_|\.\. [a-z]+::|::$", re.M)


def test_every_command_is_reached():
    names = {name for name, _ in ALL}
    assert {"cola-ray pretrain", "cola-ray shards build", "cola-ray shards verify", "cola-ray tasks prepare",
            "cola-ray replay-metrics", "cola-ray sweep"} <= names
    assert len(names) == 17  # the top level, 12 commands, shards build|verify, tasks list|prepare


@pytest.mark.parametrize("name, parser", ALL, ids=[name for name, _ in ALL])
def test_help_is_plain_text_with_defaults(name, parser):
    text = parser.format_help()
    assert not RST.search(text), f"{name} --help shows markup: {RST.search(text).group(0)!r}\n{text}"
    if name != "cola-ray":
        assert parser.description, f"{name} --help says what the command does"
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = action.default not in (None, "", False, argparse.SUPPRESS) and action.nargs != 0
        if action.option_strings and shown:
            assert action.help, f"{name} {action.option_strings[0]}: argparse shows no default without help"
            help = formatter._get_help_string(action)
            assert "default" in help.lower(), f"{name} {action.option_strings[0]}: no default in {help!r}"


def test_help_shows_the_defaults_and_exit_codes(capsys):
    assert cli.main(["shards", "build", "--help"]) == 0
    out = capsys.readouterr().out
    assert "samples per shard (default: 1000)" in out
    assert "(default: 16000)" in out
    assert "(default: False)" not in out, "a flag's default says nothing"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "The cola-ray command." in out and "``" not in out
    assert "exit codes:" in out
    for code in ("0  done", "1  a check found problems", "2  a usage or configuration error"):
        assert code in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cola-ray {metadata.version('cola-ray')}"


def test_plain_text_strips_restructuredtext():
    doc = "The ``cola-ray`` command: see :func:`~cola_ray.train.trainer.fit` and :mod:`cola_ray.config`, e.g.::\n\n    x"
    assert cli.plain_text(doc) == "The cola-ray command: see fit and cola_ray.config, e.g.:\n\n    x"
    assert cli.plain_text(None) == ""


@pytest.mark.parametrize("argv, needle", [
    (["pretrain", "train.nope=1"], "unknown config key 'train.nope'"),
    (["pretrain", "train.lr=fast"], "train.lr"),
    (["pretrain", "--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
    (["pretrain", "--nope"], "unrecognized arguments: --nope"),
    (["probe", "--task", "t"], "--encoder"),
    (["shards", "build", "src", "out", "--max-samples", "many"], "--max-samples"),
    (["nope"], "invalid choice: 'nope'"),
    ([], "required: COMMAND"),
])
def test_usage_and_config_errors_exit_2_naming_the_thing(capsys, argv, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err


def test_a_failed_check_or_run_exits_1(tmp_path, capsys, monkeypatch):
    assert cli.main(["shards", "verify", str(tmp_path)]) == 1
    assert "1 problem(s)" in capsys.readouterr().out

    from cola_ray.train import tracking

    def broken(spool, uri):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(tracking, "replay_spool", broken)
    assert cli.main(["replay-metrics", str(tmp_path / "x.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1] == "cola-ray: error: replay-metrics failed: RuntimeError: the disk caught fire"


# ---- a real subprocess (slow) ---------------------------------------------------------


def run(*args, timeout=120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("override, needle", [("train.lrr=1", "train.lrr"), ("model.similarity=dot", "model.similarity")])
def test_pretrain_rejects_bad_config_before_any_work(tmp_path, override, needle):
    result = run("pretrain", f"storage_path={tmp_path}", override, timeout=60)
    assert result.returncode == 2
    assert needle in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may start before the config is valid"


@pytest.mark.slow
def test_pretrain_names_a_missing_shard_path(tmp_path):
    result = run("pretrain", f"data.shards={tmp_path / 'no-such-shards'}", f"storage_path={tmp_path / 'runs'}",
                 "train.batch_size=8", "ray_address=127.0.0.1:1", timeout=60)
    assert result.returncode != 0
    assert "no-such-shards" in result.stderr
