"""Reliability of data and storage, with every fault injected for real (issue 6, rows 1, 6, 7, 9).

- Shard integrity: a real shard cut at >= 200 offsets (every 512-byte block boundary,
  inside every member header, random), read as a file, as a stream and zero-filled back
  to its size: every cut is detected against the manifest, no incomplete sample comes out.
- Checkpoints: a process saving checkpoints is SIGKILLed by PID at random moments; a real
  disk full (a 1 MiB tmpfs in a user+mount namespace, where the kernel allows one) and a
  real file-size limit (RLIMIT_FSIZE: the kernel fails the write with EFBIG).
- S3 faults: a proxy (tests/faultproxy.py) between the client and the moto server answers
  503 SlowDown and resets connections, for our boto3 reads (decoded_clips, a Ray Data run)
  and for the pyarrow filesystem Ray Train keeps checkpoints on; 403 and 404 fail fast
  naming the object.
- Untrusted inputs: pickles in shard members and in optimizer.pt never run.

Figures are printed (``pytest -s``) as ``FIGURE ...`` lines.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.faultproxy import FaultProxy

from cola_ray.data import audio, shards, storage
from helpers.factories import make_shards
from cola_ray.train.checkpoint import (OPTIMIZER_FILE, STATE_FILE, CheckpointError, TrainState, load_checkpoint,
                                 save_checkpoint)
from cola_ray.data.pipeline import ShardTally, decoded_clips

RATE = 16000


def figure(text: str) -> None:
    print(f"FIGURE {text}", file=sys.stderr)


# ---- row 1: shard integrity -------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """3 shards of 3 synthetic 0.4 s clips (FLAC + json each) and their manifest."""
    root = tmp_path_factory.mktemp("integrity")
    return make_shards(root, n_clips=9, seconds=0.4, seed=5, max_samples=3, labels=False)


def _samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    return list(shards.iter_samples(io.BytesIO(data), "whole"))


def _cut_offsets(data: bytes, seed: int = 0, n_random: int = 120) -> list[int]:
    """Every block boundary, offsets inside each member header, and random ones."""
    cuts = set(range(0, len(data), tarfile.BLOCKSIZE))
    for info in tarfile.open(fileobj=io.BytesIO(data)).getmembers():
        # name, size field, checksum, type flag, magic, the header's last byte; first data byte
        cuts |= {info.offset + d for d in (1, 100, 124, 148, 156, 257, 345, 511)} | {info.offset_data + 1}
    rng = random.Random(seed)
    cuts |= {rng.randrange(1, len(data)) for _ in range(n_random)}
    cuts.discard(len(data))
    return sorted(cuts)


def _complete(item, whole: dict[str, dict[str, bytes]]) -> bool:
    """A sample that came out is the very sample of the intact shard, all members, and decodes."""
    key, members = item
    if members != whole.get(key) or sorted(members) != ["flac", "json"]:
        return False
    json.loads(members["json"])
    wave, _, _ = audio.decode_audio(members["flac"], RATE, name=key)
    return wave.size > 0


def test_every_cut_of_a_shard_is_detected_and_nothing_incomplete_comes_out(built, tmp_path):
    """Row 1: >= 200 cut offsets x 3 ways of reading; 100% detected, 0 incomplete samples."""
    manifest = shards.read_manifest(str(built))
    entry = manifest["shards"][1]
    data = (built / entry["name"]).read_bytes()
    whole = dict(_samples(data))
    assert len(whole) == entry["samples"] == 3
    # The reader itself sees a good shard as good (else "detected" would mean nothing).
    tally = ShardTally(entry["name"])
    assert len(list(decoded_clips(str(built / entry["name"]), RATE, tally))) == 3 and not tally.bad

    work = tmp_path / "shards"
    shutil.copytree(built, work)
    target = work / entry["name"]
    cuts = _cut_offsets(data)
    assert len(cuts) >= 200
    stats = collections.Counter()
    for cut in cuts:
        # (a) the real reader on a cut file beside its manifest (size known up front).
        target.write_bytes(data[:cut])
        tally = ShardTally(entry["name"])
        clips = list(decoded_clips(str(target), RATE, tally))
        assert tally.bad == {"bad_shard": 1} and entry["name"] in tally.error, (cut, tally)
        stats["file_detected"] += 1
        stats["file_emitted"] += len(clips)
        for key, _, wave in clips:
            stats["file_incomplete"] += not (key in whole and wave.size > 0)
        # (b) a stream that just ends (a connection cut without an error): streaming checks.
        # (c) the cut zero-filled back to the shard's size (a crash on a preallocated file).
        for how, cut_data in (("stream", data[:cut]), ("zero_filled", data[:cut] + bytes(len(data) - cut))):
            if cut_data == data:  # a cut inside the zero padding at the end, zero-filled: no change
                stats[f"{how}_unchanged"] += 1
                continue
            got = []
            with pytest.raises(shards.ShardError) as err:
                for item in shards.iter_samples(io.BytesIO(cut_data), entry["name"], expected=entry):
                    got.append(item)
            assert err.value.shard == entry["name"]
            stats[f"{how}_detected"] += 1
            stats[f"{how}_emitted"] += len(got)
            stats[f"{how}_incomplete"] += sum(not _complete(item, whole) for item in got)
    target.write_bytes(data)
    n = len(cuts)
    figure(f"row1 cuts={n} (block boundaries, 9 offsets in/after each of {2 * len(whole)} member headers, "
           f"random); " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    for how in ("file", "stream", "zero_filled"):
        assert stats[f"{how}_detected"] + stats[f"{how}_unchanged"] == n
        assert stats[f"{how}_incomplete"] == 0
    assert stats["file_emitted"] == 0  # the size is checked before the first byte is parsed
    assert stats["stream_emitted"] > 0  # samples read whole before a cut do come out


def test_an_altered_shard_of_the_right_size_is_quarantined(built, tmp_path, caplog):
    work = tmp_path / "shards"
    shutil.copytree(built, work)
    entry = shards.read_manifest(str(work))["shards"][0]
    path = work / entry["name"]
    data = bytearray(path.read_bytes())
    members = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()
    flac = next(m for m in members if m.name.endswith(".flac"))
    data[flac.offset_data + flac.size // 2] ^= 0x01  # one bit in the first clip's audio
    path.write_bytes(bytes(data))
    tally = ShardTally(entry["name"])
    list(decoded_clips(str(path), RATE, tally))
    assert tally.bad["bad_shard"] == 1 and "sha256" in tally.error and entry["name"] in tally.error
    assert any("quarantined shard" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    # An invalid manifest quarantines the shards it would vouch for, naming it.
    (work / "manifest.json").write_text("{broken")
    other = sorted(work.glob("*.tar"))[-1]
    tally = ShardTally(other.name)
    assert list(decoded_clips(str(other), RATE, tally)) == []
    assert tally.bad == {"bad_shard": 1} and "manifest" in tally.error


@pytest.mark.slow
def test_a_truncated_shard_is_quarantined_in_a_pipeline_run(ray_local, built, tmp_path):
    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import SampleCounter, read_pairs

    work = tmp_path / "shards"
    shutil.copytree(built, work)
    manifest = shards.read_manifest(str(work))
    bad = work / manifest["shards"][2]["name"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    counter = SampleCounter.remote()
    cfg = DataConfig(shards=str(work), decode_num_cpus=0.5, segment_samples=3200)
    rows = list(read_pairs(cfg, counter).iter_rows())
    snap = ray.get(counter.snapshot.remote())
    good = sum(s["samples"] for s in manifest["shards"][:2])
    assert len(rows) == good * cfg.pairs_per_clip
    assert snap["good"] == good and snap["bad"] == {"bad_shard": 1}
    assert list(snap["bad_shards"]) == [bad.name] and "the manifest says" in snap["bad_shards"][bad.name]


@pytest.mark.slow
def test_a_quarantined_shard_is_read_once_per_run_resumes_included(ray_local, built, tmp_path):
    """Row 8b: a shard that failed is skipped (unread, uncounted) in later epochs and, from
    the quarantine its checkpoint keeps, after a resume; a changed manifest entry lifts it.
    ``cola-ray shards verify`` gives the same reason."""
    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import SampleCounter, read_pairs

    work = tmp_path / "shards"
    shutil.copytree(built, work)
    manifest = shards.read_manifest(str(work))
    bad = work / manifest["shards"][1]["name"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    cfg = DataConfig(shards=str(work), decode_num_cpus=0.5, segment_samples=3200, block_pairs=2)
    good = sum(s["samples"] for i, s in enumerate(manifest["shards"]) if i != 1)
    counter = SampleCounter.remote()
    ds = read_pairs(cfg, counter)
    for _ in range(3):  # three epochs
        assert len(list(ds.iter_rows())) == good
    snap = ray.get(counter.snapshot.remote())
    assert snap["shard_reads"][bad.name] == 1 and snap["quarantine_skips"] == 2
    assert snap["bad"] == {"bad_shard": 1} and snap["good"] == 3 * good
    reason = snap["bad_shards"][bad.name]
    [problem] = shards.verify_shards(str(work))  # the same words
    assert problem.shard == str(bad) and reason == f"shard {bad.name}: {problem.problem}"
    # A resume: a new run's counter takes over the checkpoint's quarantine (TrainState.quarantine).
    resumed = SampleCounter.remote()
    ray.get(resumed.restore.remote(snap["quarantine"]))
    assert len(list(read_pairs(cfg, resumed).iter_rows())) == good
    after = ray.get(resumed.snapshot.remote())
    assert bad.name not in after["shard_reads"] and after["bad"] == {"bad_shard": 1}
    assert after["bad_shards"] == {bad.name: reason}
    # The shard is rebuilt (its manifest entry changes): read again.
    bad.write_bytes((built / bad.name).read_bytes() + bytes(512))  # a valid tar, other bytes
    manifest["shards"][1].update(bytes=bad.stat().st_size, sha256=hashlib.sha256(bad.read_bytes()).hexdigest())
    (work / "manifest.json").write_text(json.dumps(manifest))
    assert len(list(read_pairs(cfg, resumed).iter_rows())) == good + manifest["shards"][1]["samples"]
    fixed = ray.get(resumed.snapshot.remote())
    assert fixed["shard_reads"][bad.name] == 1 and bad.name not in fixed["bad_shards"]


# ---- row 9: pickles in shards ------------------------------------------------------------

class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_shard(folder: Path, marker: Path) -> tuple[Path, dict[str, bytes]]:
    """A shard (with a manifest) whose samples also carry .pkl / .pth / .pyd payloads."""
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    import soundfile as sf

    sf.write(buf, 0.1 * np.ones(4000, dtype=np.float32), RATE, format="FLAC")
    pth = io.BytesIO()
    torch.save({"x": _Payload(marker)}, pth)
    payloads = {"pkl": pickle.dumps(_Payload(marker)), "pth": pth.getvalue(), "pyd": pickle.dumps(_Payload(marker))}
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key in ("a", "b"):
            for suffix, data in {"flac": buf.getvalue(), "json": b'{"label": "x"}', **payloads}.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = tar_buf.getvalue()
    (folder / "shard-000000.tar").write_bytes(data)
    manifest = {"format": shards.FORMAT, "sample_rate": RATE, "complete": True, "build": {}, "skipped": [],
                "shards": [{"name": "shard-000000.tar", "bytes": len(data), "samples": 2,
                            "sha256": hashlib.sha256(data).hexdigest(), "sources": [0, 2]}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "shard-000000.tar", payloads


def test_pickled_shard_members_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned-shard"
    shard, payloads = _pickled_shard(tmp_path / "shards", marker)
    tally = ShardTally(shard.name)
    clips = list(decoded_clips(str(shard), RATE, tally))
    assert [k for k, _, _ in clips] == ["a", "b"] and not tally.bad  # the audio is still used
    assert tally.refused == {"pickle_member": 6}
    assert not marker.exists()
    # Control: the payload is live, so the test above could fail.
    pickle.loads(payloads["pkl"])
    assert marker.exists()


@pytest.mark.slow
def test_pickled_shard_members_never_run_in_a_pipeline_run(ray_local, tmp_path):
    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import SampleCounter, read_pairs

    marker = tmp_path / "pwned-ray"
    shard, _ = _pickled_shard(tmp_path / "shards", marker)
    counter = SampleCounter.remote()
    rows = list(read_pairs(DataConfig(shards=str(shard.parent), decode_num_cpus=0.5,
                                      segment_samples=3200), counter).iter_rows())
    snap = ray.get(counter.snapshot.remote())
    assert len(rows) == 2 and snap["good"] == 2 and snap["bad"] == {}
    assert snap["refused"] == {"pickle_member": 6}
    assert not marker.exists()


# ---- row 6 and 9: checkpoints ------------------------------------------------------------

def _small_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 32)).sum().backward()
    opt.step()
    return model, opt


def test_a_pickle_in_optimizer_pt_is_refused_and_never_runs(tmp_path):
    """Row 9: raw pickle and torch zip formats; with state.json's digest forged to match, and not."""
    model, opt = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fmt in ("pickle", "torch"):
        for forged in (True, False):
            marker = tmp_path / f"pwned-{fmt}-{forged}"
            folder = save_checkpoint(tmp_path / f"ckpt-{fmt}-{forged}", model, opt, TrainState(step=3))
            if fmt == "pickle":
                payload = pickle.dumps({"state": _Payload(marker)})
            else:
                buf = io.BytesIO()
                torch.save({"state": _Payload(marker)}, buf)
                payload = buf.getvalue()
            (folder / OPTIMIZER_FILE).write_bytes(payload)
            if forged:  # an attacker who rewrites state.json too: weights_only is what stops it
                state = json.loads((folder / STATE_FILE).read_text())
                state["files"][OPTIMIZER_FILE] = {"bytes": len(payload),
                                                  "sha256": hashlib.sha256(payload).hexdigest()}
                (folder / STATE_FILE).write_text(json.dumps(state))
            target, target_opt = _small_model()
            with torch.no_grad():
                for p in target.parameters():
                    p.zero_()
            with pytest.raises(CheckpointError, match=OPTIMIZER_FILE) as err:
                load_checkpoint(folder, target, target_opt)
            assert ("weights-only" if forged else "altered checkpoint") in str(err.value)
            assert not marker.exists()
            assert all(float(p.detach().abs().sum()) == 0 for p in target.parameters())  # nothing half-loaded
            # Control: the same bytes do run code when unpickled the unsafe way.
            if fmt == "pickle":
                pickle.loads(payload)
            else:
                torch.load(io.BytesIO(payload), weights_only=False)
            assert marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_copied_in_part_is_refused_and_changes_nothing(tmp_path):
    """What an interrupted copy or upload leaves (state.json there, a file short or missing)."""
    model, opt = _small_model()
    folder = save_checkpoint(tmp_path / "whole", model, opt, TrainState(step=5))
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    for name in ("model.safetensors", OPTIMIZER_FILE):
        for cut in (0, 8, sizes[name] // 2, sizes[name] - 1, None):
            part = tmp_path / f"part-{name}-{cut}"
            shutil.copytree(folder, part)
            if cut is None:
                (part / name).unlink()
            else:
                (part / name).write_bytes((folder / name).read_bytes()[:cut])
            target, target_opt = _small_model()
            with torch.no_grad():
                for p in target.parameters():
                    p.zero_()
            with pytest.raises(CheckpointError, match=name):
                load_checkpoint(part, target, target_opt)
            assert all(float(p.detach().abs().sum()) == 0 for p in target.parameters())
    assert load_checkpoint(folder, *_small_model()).step == 5


_SAVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from cola_ray.train.checkpoint import TrainState, save_checkpoint
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 512)).sum().backward()
    opt.step()

    def fill(step):  # every tensor of checkpoint <step> holds the value <step>
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        for st in opt.state.values():
            st["exp_avg"].fill_(step)
            st["exp_avg_sq"].fill_(step)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:  # one line per trial: "<folder> <first step>"
        folder, step = line.split()
        step = int(step)
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            while True:
                fill(step)
                save_checkpoint(f"{folder}/checkpoint_{step:06d}", model, opt, TrainState(step=step))
                save_checkpoint(f"{folder}/latest", model, opt, TrainState(step=step))
                step += 1
        print(pid, flush=True)
""")


def _saver_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 512)).sum().backward()
    opt.step()
    return model, opt


def _fill(model: torch.nn.Module, opt: torch.optim.Optimizer, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    for st in opt.state.values():
        st["exp_avg"].fill_(value)
        st["exp_avg_sq"].fill_(value)


def _loads_whole(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """The step of a checkpoint that loads, checked tensor by tensor against it."""
    _fill(model, opt, -1.0)  # a sentinel: any tensor the load did not set shows up
    state = load_checkpoint(folder, model, opt)
    values = {float(v) for p in model.parameters() for v in (p.min(), p.max())}
    values |= {float(v) for st in opt.state_dict()["state"].values() for v in (st["exp_avg"].min(),
                                                                                 st["exp_avg"].max())}
    assert values == {float(state.step)}, f"{folder} loaded a mix of steps {values}"
    return state.step


def _pid_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise TimeoutError(f"pid {pid} still there")


@pytest.mark.slow
@pytest.mark.slow  # a subprocess
def test_a_save_killed_at_random_points_never_leaves_a_partial_checkpoint(tmp_path):
    """Row 6: >= 20 saves SIGKILLed by PID at random moments (12.6 MB checkpoints)."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    zygote = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    rng = random.Random(6)
    model, opt = _saver_model()
    _fill(model, opt, 1.0)
    previous = save_checkpoint(tmp_path / "previous", model, opt, TrainState(step=1))
    stats = collections.Counter()
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for trial in range(24):
            folder = tmp_path / f"trial-{trial:02d}"
            # The previous checkpoint, committed before the saver starts: step 1.
            shutil.copytree(previous, folder / "checkpoint_000001")
            shutil.copytree(previous, folder / "latest")
            zygote.stdin.write(f"{folder} 2\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.02, 0.6))
            os.kill(pid, signal.SIGKILL)
            _pid_gone(pid)
            stats["killed"] += 1
            visible = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
            hidden = sorted(p for p in folder.iterdir() if p.name.startswith("."))
            stats["killed_mid_save"] += bool(hidden)
            steps = {}
            for path in visible:  # every checkpoint a user or a resume would find loads whole
                try:
                    steps[path.name] = _loads_whole(path, model, opt)
                except Exception as e:  # noqa: BLE001 - counted, then failed below
                    stats["partial_loads"] += 1
                    print(f"{path}: {e}", file=sys.stderr)
            stats["previous_loads"] += steps.get("checkpoint_000001") == 1
            stats["latest_loads"] += "latest" in steps
            stats["committed_by_saver"] += len(visible) - 2
            for path in hidden:  # leftovers of a killed save: refused, or whole
                try:
                    _loads_whole(path, model, opt)
                    stats["leftover_loads_whole"] += 1
                except (CheckpointError, FileNotFoundError):
                    stats["leftover_refused"] += 1
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait(10)
    figure("row6 kill " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    assert stats["killed"] >= 20 and stats["killed_mid_save"] >= 10
    assert stats["partial_loads"] == 0
    assert stats["previous_loads"] == stats["latest_loads"] == stats["killed"]


_FULL_DISK = textwrap.dedent("""
    import errno, json, resource, signal, sys
    import torch
    from pathlib import Path
    from cola_ray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
    root, mode = Path(sys.argv[1]), sys.argv[2]
    small = torch.nn.Linear(16, 16)
    save_checkpoint(root / "checkpoint_1", small, torch.optim.SGD(small.parameters(), lr=0.1), TrainState(step=1))
    if mode == "fsize":  # the kernel refuses writes past 1 MiB in any file (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    big = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: more than the disk / limit allows
    out = {}
    for name in ("checkpoint_2", "checkpoint_1"):  # a new folder, then over the previous one
        try:
            save_checkpoint(root / name, big, None, TrainState(step=2))
            out[name] = "saved"
        except OSError as e:
            out[name] = [errno.errorcode.get(e.errno, str(e.errno)), str(e)]
    fresh = torch.nn.Linear(16, 16)
    out["previous"] = load_checkpoint(root / "checkpoint_1", fresh).step
    out["previous_equal"] = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                                 small.state_dict().values()))
    out["left"] = sorted(p.name for p in root.iterdir())
    print(json.dumps(out))
""")


def _full_disk_run(tmp_path: Path, mode: str) -> dict:
    script = tmp_path / "full.py"
    script.write_text(_FULL_DISK)
    root = tmp_path / f"disk-{mode}"
    root.mkdir()
    cmd = [sys.executable, str(script), str(root), mode]
    if mode == "tmpfs":
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
               'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"', "sh", str(root), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tmpfs_allowed(probe: Path) -> bool:
    """Whether this kernel lets an unprivileged user mount a tmpfs in its own namespaces."""
    if not shutil.which("unshare"):
        return False
    probe.mkdir()
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", str(probe)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.parametrize("mode", ["tmpfs", "fsize"])
def test_disk_full_during_a_save_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, mode):
    """Row 6: ENOSPC on a real 1 MiB tmpfs (skipped where user namespaces are not allowed) and
    EFBIG from RLIMIT_FSIZE (always): a real failed write(2) in both."""
    if mode == "tmpfs" and not _tmpfs_allowed(tmp_path / "probe"):
        pytest.skip("unshare --user --mount is not allowed here; the RLIMIT_FSIZE case still runs")
    out = _full_disk_run(tmp_path, mode)
    want = "ENOSPC" if mode == "tmpfs" else "EFBIG"
    figure(f"row6 disk-full {mode}: {out}")
    for name in ("checkpoint_2", "checkpoint_1"):
        code, message = out[name]
        assert code == want and f"checkpoint {Path(tmp_path, f'disk-{mode}', name)} not saved" in message
    assert out["previous"] == 1 and out["previous_equal"]
    assert out["left"] == ["checkpoint_1"]  # the partial files are gone, freeing the space


# ---- row 7: S3 faults --------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_shards(built, moto_s3):
    """The shards of ``built`` (9 samples, 3 shards) uploaded to a bucket, directly to moto."""
    import boto3
    import uuid

    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/shards"
    for path in sorted(built.iterdir()):
        storage.upload_file(path, f"{url}/{path.name}", endpoint_url=moto_s3)
    return url, shards.read_manifest(url, endpoint_url=moto_s3)


@pytest.mark.slow
def test_s3_slowdowns_and_resets_lose_no_sample(s3_shards, moto_s3):
    """Row 7: 20% of requests 503 SlowDown, 15% reset (before or mid-response)."""
    url, manifest = s3_shards
    with FaultProxy(moto_s3, p_slowdown=0.2, p_reset=0.15, seed=7) as proxy:
        t0 = time.monotonic()
        counts = {}
        for _ in range(3):  # three epochs' worth of reads
            for entry in manifest["shards"]:
                tally = ShardTally(entry["name"])
                clips = list(decoded_clips(f"{url}/{entry['name']}", RATE, tally, endpoint_url=proxy.url))
                assert not tally.bad, tally
                counts[entry["name"]] = counts.get(entry["name"], 0) + len(clips)
        took = time.monotonic() - t0
    want = {e["name"]: 3 * e["samples"] for e in manifest["shards"]}
    lost = sum(want.values()) - sum(counts.values())
    figure(f"row7 decoded_clips: requests={proxy.counts['requests']} slowdown_503={proxy.counts['slowdown']} "
           f"reset_before={proxy.counts['reset_before']} reset_mid={proxy.counts['reset_mid']} "
           f"samples={sum(counts.values())}/{sum(want.values())} lost={lost} in {took:.1f}s")
    assert counts == want
    assert proxy.counts["slowdown"] >= 3 and proxy.counts["reset_before"] >= 1 and proxy.counts["reset_mid"] >= 1


@pytest.mark.slow
def test_s3_faults_in_a_pipeline_run_lose_no_sample(ray_local, s3_shards, moto_s3):
    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import SampleCounter, read_pairs

    url, manifest = s3_shards
    with FaultProxy(moto_s3, p_slowdown=0.2, p_reset=0.15, seed=8) as proxy:
        counter = SampleCounter.remote()
        cfg = DataConfig(shards=url, s3_endpoint_url=proxy.url, decode_num_cpus=0.5, segment_samples=3200)
        rows = list(read_pairs(cfg, counter).iter_rows())
        snap = ray.get(counter.snapshot.remote())
    total = sum(e["samples"] for e in manifest["shards"])
    figure(f"row7 read_pairs: requests={proxy.counts['requests']} slowdown_503={proxy.counts['slowdown']} "
           f"reset_before={proxy.counts['reset_before']} reset_mid={proxy.counts['reset_mid']} "
           f"samples={snap['good']}/{total} lost={total - snap['good']}")
    assert len(rows) == total * cfg.pairs_per_clip and snap["good"] == total and snap["bad"] == {}
    assert proxy.faults >= 2


@pytest.mark.slow
def test_s3_403_and_404_fail_fast_naming_the_object(s3_shards, moto_s3):
    """Row 7: permanent errors are not retried (nor quarantined as a bad shard): the read
    fails within seconds naming the object."""
    url, manifest = s3_shards
    denied = f"{url}/{manifest['shards'][0]['name']}"
    bucket, key = storage.split_s3(denied)
    with FaultProxy(moto_s3, deny={f"/{bucket}/{key}"}) as proxy:
        t0 = time.monotonic()
        with pytest.raises(PermissionError, match=denied):
            list(decoded_clips(denied, RATE, ShardTally("x"), endpoint_url=proxy.url))
        took_403 = time.monotonic() - t0
        assert proxy.counts["denied"] == 1  # asked once: not retried
    # A shard the manifest lists but the bucket does not have.
    gone = f"{url}-404/{manifest['shards'][0]['name']}"
    storage.write_bytes(f"{url}-404/manifest.json", storage.read_bytes(f"{url}/manifest.json", moto_s3), moto_s3)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match=gone):
        list(decoded_clips(gone, RATE, ShardTally("x"), endpoint_url=moto_s3))
    took_404 = time.monotonic() - t0
    figure(f"row7 permanent: 403 failed in {took_403:.2f}s, 404 failed in {took_404:.2f}s")
    assert took_403 < 5 and took_404 < 5


@pytest.mark.slow
def test_s3_403_fails_a_pipeline_run_fast_naming_the_object(ray_local, s3_shards, moto_s3):
    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import read_pairs

    url, manifest = s3_shards
    denied = f"{url}/{manifest['shards'][1]['name']}"
    bucket, key = storage.split_s3(denied)
    with FaultProxy(moto_s3, deny={f"/{bucket}/{key}"}) as proxy:
        cfg = DataConfig(shards=url, s3_endpoint_url=proxy.url, decode_num_cpus=0.5, segment_samples=3200)
        t0 = time.monotonic()
        with pytest.raises(Exception) as err:
            list(read_pairs(cfg).iter_rows())
        took = time.monotonic() - t0
    figure(f"row7 permanent 403 in a Ray Data run: failed in {took:.1f}s after {proxy.counts['denied']} "
           f"denied request(s): {type(err.value).__name__}")
    assert denied in str(err.value) and "AccessDenied" in str(err.value)
    assert took < 30


@pytest.mark.slow
def test_s3_faults_on_ray_trains_checkpoint_filesystem_lose_nothing(s3_bucket, moto_s3):
    """Row 7 for the other S3 client: Ray Train writes and restores checkpoints through the
    pyarrow S3 filesystem of ``storage.pyarrow_filesystem`` (AWS SDK retries, 10 attempts)."""
    payload = np.random.default_rng(0).bytes(2 << 20)
    with FaultProxy(moto_s3, p_slowdown=0.2, p_reset=0.15, seed=9) as proxy:
        fs, root = storage.pyarrow_filesystem(f"{s3_bucket}/runs", endpoint_url=proxy.url)
        t0 = time.monotonic()
        for i in range(2):
            with fs.open_output_stream(f"{root}/checkpoint_{i}/model.safetensors") as f:
                f.write(payload)
            with fs.open_input_stream(f"{root}/checkpoint_{i}/model.safetensors") as f:
                assert f.read() == payload
        took = time.monotonic() - t0
    figure(f"row7 pyarrow S3 (checkpoint storage): requests={proxy.counts['requests']} "
           f"slowdown_503={proxy.counts['slowdown']} reset_before={proxy.counts['reset_before']} "
           f"reset_mid={proxy.counts['reset_mid']} files 2/2 byte-identical in {took:.1f}s")
    assert proxy.faults >= 3


# ---- row 2: every kind of bad sample, planted at known positions --------------------------------

def _wav(wave: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_every_kind_of_bad_sample_planted_at_known_positions_is_counted_exactly(ray_local, tmp_path, monkeypatch):
    """Shards made elsewhere (no manifest) with one of each fault at a known position: the
    pipeline's counts match the plan exactly, nothing lands on disk, no pickle runs, and the
    error budget turns the counts into a clear failure naming the shard."""
    import ray

    from cola_ray.config import DataConfig
    from cola_ray.data.pipeline import ErrorBudgetExceeded, SampleCounter, check_budget, read_pairs

    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(np.linspace(0, 2000, 32000))).astype(np.float32)  # 2 s at 16 kHz
    nan = tone.copy()
    nan[100] = np.nan
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(type("P", (), {"__reduce__": lambda self: (open, (str(marker), "w"))})())
    stereo_44k = (0.2 * rng.standard_normal((88200, 2))).astype(np.float32)
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "x-000.tar", [
        ("a.wav", _wav(tone)), ("a.json", b'{"label": "tone"}'),      # good
        ("b.flac", b"not audio at all"),                              # decode_error
        ("c.wav", b""),                                               # empty (zero bytes)
        ("d.wav", _wav(np.zeros(0, np.float32))),                     # empty (header only)
        ("e.wav", _wav(nan, subtype="FLOAT")),                        # non_finite
        ("f.wav", _wav(tone[:3200])),                                 # too_short (0.2 s, skip)
        ("g.wav", _wav(stereo_44k, 44100, "FLOAT")),                  # good: resampled, down-mixed
        ("h.json", b'{"label": "x"}'),                                # no_audio_member
        ("i.wav", _wav(tone)), ("i.json", b"{broken"),                # bad_json
        ("../../escape.wav", _wav(tone)),                             # bad_key (traversal)
        ("/abs/olute.wav", _wav(tone)),                               # bad_key (absolute)
        ("j.wav", _wav(tone)), ("j.pkl", payload),                    # good; the pickle refused
    ])
    # Keys not grouped (k, l, then k again): the shard is given up at the second k, named.
    _tar(tmp_path / "shards" / "x-001.tar", [("k.wav", _wav(tone)), ("l.wav", _wav(tone)), ("k.json", b"{}")])
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    counter = SampleCounter.remote()
    data = DataConfig(shards=str(tmp_path / "shards"), decode_num_cpus=0.5, short_clips="skip")
    rows = list(read_pairs(data, counter).iter_rows())
    snap = ray.get(counter.snapshot.remote())
    assert snap["bad"] == {"decode_error": 1, "empty": 2, "non_finite": 1, "too_short": 1, "no_audio_member": 1,
                           "bad_json": 1, "bad_key": 2, "bad_shard": 1}, snap
    # a, g, j from x-000; k and l from x-001 (each whole as far as the stream showed: the
    # fault is seen when k's json arrives after l, and the shard is given up there).
    assert snap["good"] == 5 and len(rows) == 5, snap
    assert snap["refused"] == {"pickle_member": 1}
    assert list(snap["bad_shards"]) == ["x-001.tar"] and "k" in snap["bad_shards"]["x-001.tar"]
    assert all(r["anchor"].shape == (data.segment_samples,) and np.isfinite(r["anchor"]).all() for r in rows)
    assert not marker.exists(), "the pickle payload ran"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was written"
    assert not (tmp_path.parent / "escape.wav").exists() and not Path("/abs/olute.wav").exists()
    with pytest.raises(ErrorBudgetExceeded, match="x-00"):
        check_budget(snap, DataConfig(min_samples_for_budget=1))
