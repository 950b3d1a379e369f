"""shards.py and storage.py: build, read, verify and resume, locally and on a real S3 API.

Faults are injected for real: shards are cut, bytes flipped, files removed, connections
reset by a proxy. Data is made on the fly in tmp_path.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cola_ray.data import shards, storage
from cola_ray.data.audio import BadSample, decode_audio
from cola_ray.data.shards import ShardError, build_shards, iter_samples, verify_shards


# ---- helpers ---------------------------------------------------------------------------

def write_audio(path: Path, seconds: float, rate: int, channels: int = 1, fmt: str = "WAV",
                subtype: str = "PCM_16", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * rate)
    x = 0.3 * np.random.default_rng(seed).standard_normal((n, channels)).astype(np.float32)
    sf.write(path, x, rate, format=fmt, subtype=subtype)


@pytest.fixture
def source(tmp_path) -> tuple[Path, Path]:
    """A small folder of mixed audio + a labels CSV; returns (src, labels_csv)."""
    src = tmp_path / "src"
    write_audio(src / "dogs" / "bark.01.wav", 0.5, 44100, channels=2)           # stereo 44.1 kHz
    write_audio(src / "dogs" / "bark_02.flac", 0.3, 16000, fmt="FLAC", seed=1)
    write_audio(src / "cats" / "meow.ogg", 0.4, 22050, fmt="OGG", subtype="VORBIS", seed=2)
    write_audio(src / "cats" / "purr.mp3", 0.6, 16000, fmt="MP3", subtype="MPEG_LAYER_III", seed=3)
    write_audio(src / "birds" / "a.wav", 0.2, 8000, seed=4)
    write_audio(src / "birds" / "a.flac", 0.2, 16000, fmt="FLAC", seed=5)     # same stem as a.wav
    write_audio(src / "loud.wav", 0.2, 16000, fmt="WAV", subtype="FLOAT", seed=6)
    (src / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot really audio")
    (src / "notes.txt").write_text("not audio, ignored")
    (src / ".hidden.wav").write_bytes(b"junk")
    # Scale loud.wav past full scale: PCM_16 must not wrap it around.
    x, r = sf.read(src / "loud.wav", dtype="float32")
    sf.write(src / "loud.wav", x * 20, r, subtype="FLOAT")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,label,split\n"
        "dogs/bark.01.wav,dog,train\n"
        f"{src / 'dogs' / 'bark_02.flac'},dog,test\n"       # absolute path
        "cats/meow.ogg,cat,train\n"
        "cats/purr.mp3,cat\n"                                # no split
        "missing/elsewhere.wav,ghost,train\n"                # not in SRC: ignored
    )
    return src, labels


def make_tar(members: list[tuple[str, bytes]], **kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, **kw) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def collect(data: bytes, name: str = "s.tar"):
    return list(iter_samples(io.BytesIO(data), name))


def build(src, out, labels=None, **kw):
    return build_shards(src, str(out), labels_csv=labels, progress=False, **kw)


# ---- build -----------------------------------------------------------------------------

def test_build_writes_shards_manifest_and_members(source, tmp_path):
    src, labels = source
    out = tmp_path / "out"
    manifest = build(src, out, labels, max_samples=3)

    assert manifest["format"] == "cola-ray-shards/1" and manifest["sample_rate"] == 16000
    assert manifest["complete"] is True
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # The unreadable file is reported, not fatal; non-audio and hidden files are not tried.
    assert [(s["source"], s["reason"]) for s in manifest["skipped"]] == [("broken.wav", "decode_error")]
    ranges = [s["sources"] for s in manifest["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))

    samples = {}
    for entry, url in zip(manifest["shards"], shards.shard_urls(str(out))):
        assert os.path.getsize(url) == entry["bytes"]
        for item in iter_samples(open(url, "rb"), url):
            key, members = item
            assert sorted(members) == ["flac", "json"]
            samples[key] = members
    assert sorted(samples) == sorted([
        "birds__a", "birds__a_2", "cats__meow", "cats__purr", "dogs__bark_01", "dogs__bark_02", "loud",
    ])
    assert all("." not in k and "/" not in k for k in samples)

    meta = {k: json.loads(m["json"]) for k, m in samples.items()}
    bark = meta["dogs__bark_01"]
    assert bark["key"] == "dogs__bark_01" and bark["source"] == "dogs/bark.01.wav"
    assert (bark["orig_sample_rate"], bark["orig_channels"]) == (44100, 2)
    assert (bark["label"], bark["split"]) == ("dog", "train")
    assert bark["duration"] == pytest.approx(0.5, abs=1e-3)
    assert meta["dogs__bark_02"]["split"] == "test"            # absolute path in the CSV
    assert meta["cats__purr"]["label"] == "cat" and "split" not in meta["cats__purr"]
    assert "label" not in meta["birds__a"]
    assert {meta["birds__a"]["source"], meta["birds__a_2"]["source"]} == {"birds/a.flac", "birds/a.wav"}
    assert meta["loud"]["gain"] < 1.0

    for key, members in samples.items():
        info = sf.info(io.BytesIO(members["flac"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        wave, _, _ = decode_audio(members["flac"], 16000)
        assert wave.shape[0] == round(meta[key]["duration"] * 16000)
    loud, _, _ = decode_audio(samples["loud"]["flac"], 16000)
    assert 0.9 < np.abs(loud).max() <= 1.0  # scaled, not wrapped around


def test_build_is_deterministic(source, tmp_path):
    src, labels = source
    a = build(src, tmp_path / "a", labels, max_samples=2)
    b = build(src, tmp_path / "b", labels, max_samples=2)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_build_max_bytes_closes_shards(source, tmp_path):
    src, _ = source
    manifest = build(src, tmp_path / "out", max_samples=1000, max_bytes=40_000)
    assert len(manifest["shards"]) > 1
    for entry in manifest["shards"]:
        assert entry["bytes"] <= 40_000 + tarfile.RECORDSIZE or entry["samples"] == 1


def test_rerun_skips_complete_shards(source, tmp_path):
    src, labels = source
    out = tmp_path / "out"
    first = build(src, out, labels, max_samples=3)
    old = time.time() - 3600
    for p in out.glob("*.tar"):
        os.utime(p, (old, old))
    again = build(src, out, labels, max_samples=3)
    assert again["shards"] == first["shards"]
    assert all(p.stat().st_mtime == pytest.approx(old) for p in out.glob("*.tar"))


def test_interrupted_build_resumes_after_the_last_complete_shard(source, tmp_path):
    src, labels = source
    out = tmp_path / "out"
    full = build(src, out, labels, max_samples=2)
    # What an interruption during shard 2 leaves: manifest of shards 0-1, a partial file.
    partial = dict(full, shards=full["shards"][:2], complete=False,
                   skipped=[s for s in full["skipped"] if s["source"] < "c"])
    (out / "manifest.json").write_text(json.dumps(partial))
    for entry in full["shards"][2:]:
        (out / entry["name"]).unlink()
    (out / ".shard-000002.tar.partial").write_bytes(b"half a shard")
    old = time.time() - 3600
    for entry in full["shards"][:2]:
        os.utime(out / entry["name"], (old, old))

    resumed = build(src, out, labels, max_samples=2)

    assert resumed["shards"] == full["shards"]            # same names, sizes, hashes
    assert resumed["skipped"] == full["skipped"]
    for entry in full["shards"][:2]:
        assert (out / entry["name"]).stat().st_mtime == pytest.approx(old)
    assert not list(out.glob(".*partial")) and verify_shards(str(out)) == []


def test_rebuild_with_other_settings_is_refused(source, tmp_path):
    src, labels = source
    build(src, tmp_path / "out", labels, max_samples=3)
    with pytest.raises(ValueError, match="other sources or settings"):
        build(src, tmp_path / "out", labels, max_samples=4)


def test_build_from_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        build(tmp_path / "empty", tmp_path / "out")


def test_synthetic_corpus_builds(tmp_path):
    from cola_ray.data.synthetic import make_corpus

    labels = make_corpus(tmp_path / "corpus", n_clips=12, seconds=1.0, n_classes=4, seed=3)
    manifest = build(tmp_path / "corpus", tmp_path / "out", labels, max_samples=5)
    assert sum(s["samples"] for s in manifest["shards"]) == 12 and not manifest["skipped"]
    url = shards.shard_urls(str(tmp_path / "out"))[0]
    metas = [json.loads(m["json"]) for _, m in iter_samples(open(url, "rb"), url)]
    assert {m["label"] for m in metas} <= {"tones", "chirps", "noise", "clicks"}
    assert all(m["split"] in ("train", "validation", "test") for m in metas)


# ---- verify ----------------------------------------------------------------------------

@pytest.fixture
def built(source, tmp_path) -> tuple[Path, dict]:
    src, labels = source
    out = tmp_path / "out"
    return out, build(src, out, labels, max_samples=3)


def test_verify_passes_on_a_fresh_build(built):
    out, _ = built
    assert verify_shards(str(out)) == []


def test_verify_catches_truncation(built):
    out, manifest = built
    path = out / manifest["shards"][1]["name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    problems = verify_shards(str(out))
    assert len(problems) == 1 and problems[0].shard.endswith("shard-000001.tar")
    assert "size" in problems[0].problem


def test_verify_catches_a_flipped_byte(built):
    out, manifest = built
    path = out / manifest["shards"][0]["name"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_shards(str(out))
    assert problems and all(p.shard.endswith("shard-000000.tar") for p in problems)
    assert any("sha256" in p.problem or "corrupt" in p.problem for p in problems)


def test_verify_catches_missing_and_unlisted_shards(built):
    out, manifest = built
    (out / manifest["shards"][2]["name"]).unlink()
    (out / "stray.tar").write_bytes(make_tar([("k.flac", b"x")]))
    found = {Path(p.shard).name: p.problem for p in verify_shards(str(out))}
    assert "missing" in found["shard-000002.tar"]
    assert "not listed" in found["stray.tar"]


def test_verify_without_manifest_checks_the_tars(tmp_path):
    (tmp_path / "good.tar").write_bytes(make_tar([("a.flac", b"x"), ("a.json", b"{}")]))
    (tmp_path / "noaudio.tar").write_bytes(make_tar([("b.json", b"{}")]))
    (tmp_path / "ungrouped.tar").write_bytes(make_tar([("a.flac", b"x"), ("b.flac", b"y"), ("a.json", b"{}")]))
    (tmp_path / "cut.tar").write_bytes(make_tar([("a.flac", b"x" * 3000)])[:1500])
    found = {Path(p.shard).name: p.problem for p in verify_shards(str(tmp_path))}
    assert set(found) == {"noaudio.tar", "ungrouped.tar", "cut.tar"}
    assert "no_audio_member" in found["noaudio.tar"]
    assert "not grouped" in found["ungrouped.tar"]
    assert "truncated" in found["cut.tar"]


# ---- iter_samples ----------------------------------------------------------------------

def test_iter_samples_groups_members_and_keeps_the_allowlist():
    data = make_tar([
        ("a.flac", b"A"), ("a.json", b"{}"), ("a.pkl", b"\x80\x04evil"), ("a.pt", b"evil"),
        ("dir/b.WAV", b"B"), ("dir/b.txt", b"t"),
        (".hidden", b"h"), ("noext", b"n"),
        ("c.seg.flac", b"C"),
    ])
    items = collect(data)
    assert items == [("a", {"flac": b"A", "json": b"{}"}), ("dir/b", {"wav": b"B"}), ("c", {})]


def test_iter_samples_skips_hostile_names_without_extracting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_tar([
        ("ok.flac", b"1"),
        ("/etc/evil.flac", b"2"), ("/etc/evil.json", b"{}"),
        ("../../escape.flac", b"3"),
        ("a/../../up.flac", b"4"),
        ("C:\\win\\x.flac", b"5"),
        ("..\\dotted.flac", b"ignored: no key before the first dot"),
        ("ctl\x01name.flac", b"6"),
        ("fine.flac", b"7"),
    ])
    items = collect(data)
    good = [i for i in items if not isinstance(i, BadSample)]
    bad = [i for i in items if isinstance(i, BadSample)]
    assert good == [("ok", {"flac": b"1"}), ("fine", {"flac": b"7"})]
    assert len(bad) == 5 and {b.reason for b in bad} == {"bad_key"}
    assert "/etc/evil" in str(bad[0]) and "s.tar" in str(bad[0])
    assert list(tmp_path.iterdir()) == [] and not Path("/etc/evil.flac").exists()


def test_iter_samples_ignores_links_and_directories():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("link.flac")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        info = tarfile.TarInfo("k.flac")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"k"))
    assert collect(buf.getvalue()) == [("k", {"flac": b"k"})]


def test_iter_samples_raises_on_keys_not_grouped():
    data = make_tar([("a.flac", b"1"), ("b.flac", b"2"), ("a.json", b"{}")])
    with pytest.raises(ShardError, match="'a' reappears") as err:
        collect(data, "shard-000009.tar")
    assert err.value.shard == "shard-000009.tar"


def test_iter_samples_raises_on_duplicate_member():
    with pytest.raises(ShardError, match="duplicate"):
        collect(make_tar([("a.flac", b"1"), ("a.flac", b"2")]))


@pytest.mark.parametrize("data", [b"", b"not a tar at all" * 100, b"\0" * 100])
def test_iter_samples_raises_on_garbage(data):
    with pytest.raises(ShardError, match="bad.tar"):
        collect(data, "bad.tar")


def test_iter_samples_reads_an_empty_archive():
    assert collect(make_tar([])) == []


def test_iter_samples_reads_gzipped_tars():
    data = make_tar([("a.flac", b"1" * 5000), ("a.json", b"{}"), ("b.flac", b"2")])
    assert collect(gzip.compress(data)) == collect(data)
    with pytest.raises(ShardError):
        collect(gzip.compress(data)[:-20])


def test_every_truncation_is_caught_or_harmless():
    """Reliability matrix row 1: >= 200 cut offsets, none yields an incomplete sample."""
    members = []
    for i in range(5):
        members += [(f"k{i}.flac", bytes([i]) * (700 + 611 * i)), (f"k{i}.json", b'{"i": %d}' % i)]
    data = make_tar(members)
    full = collect(data)
    last = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
    end_of_members = last.offset_data + -(-last.size // 512) * 512
    cuts = sorted(set(range(0, len(data), max(1, len(data) // 300)))
                  | {end_of_members, end_of_members + 511, end_of_members + 512, len(data) - 1})
    assert len(cuts) >= 200
    for cut in cuts:
        got = []
        try:
            for item in iter_samples(io.BytesIO(data[:cut]), "cut.tar"):
                got.append(item)
        except ShardError as e:
            assert e.shard == "cut.tar"
            assert got == full[: len(got)] and len(got) < len(full)  # only whole samples came out
            assert cut < end_of_members + 512, f"cut at {cut} lost nothing but was refused"
            continue
        # Accepted only when nothing was lost: the end-of-archive marker is there.
        assert got == full, f"cut at {cut} silently lost samples"
        assert cut >= end_of_members + 512


def test_corrupt_header_is_caught():
    data = bytearray(make_tar([("a.flac", b"1" * 600), ("b.flac", b"2" * 600)]))
    data[512 + 1024 + 10] ^= 0xFF  # inside b.flac's header: its checksum no longer matches
    with pytest.raises(ShardError, match="corrupt"):
        collect(bytes(data))


def test_sample_meta():
    assert shards.sample_meta({"json": b'{"label": "dog"}'}) == {"label": "dog"}
    assert shards.sample_meta({}) == {}
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(BadSample) as err:
            shards.sample_meta({"json": raw}, "s:k")
        assert err.value.reason == "bad_json"


# ---- listing and storage (local) -------------------------------------------------------

def test_shard_urls_without_manifest_lists_tars(tmp_path):
    for name in ("b.tar", "a.tar", "sub/c.tar", "x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(make_tar([]))
    expected = [str(tmp_path / n) for n in ("a.tar", "b.tar", "sub/c.tar")]
    assert shards.shard_urls(str(tmp_path)) == expected
    assert storage.list_files(str(tmp_path / "*.tar")) == expected[:2]
    assert storage.list_files(str(tmp_path / "b.tar")) == [expected[1]]


def test_list_files_names_a_missing_path(tmp_path):
    missing = tmp_path / "no" / "such" / "shards"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        storage.list_files(str(missing))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.list_files(str(tmp_path / "nothing-here*.tar"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        shards.shard_urls(str(tmp_path))


def test_read_manifest_missing_and_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        shards.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="manifest.json"):
        shards.read_manifest(str(tmp_path))
    assert any("manifest.json" in p.shard for p in verify_shards(str(tmp_path)))


def test_write_bytes_is_atomic_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "file.json"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two" and storage.exists(str(target))
    assert os.listdir(target.parent) == ["file.json"]
    assert not storage.exists(str(tmp_path / "nope"))


def test_storage_names():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3/b")
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        storage.split_s3("/local/path")
    assert storage.join("s3://b/p/", "m.json") == "s3://b/p/m.json"


def test_pyarrow_filesystem_local_and_s3(tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage.pyarrow_filesystem(str(tmp_path / "x.tar"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x.tar")
    fs, path = storage.pyarrow_filesystem("s3://b/k/x.tar", endpoint_url="https://minio.local:9000",
                                          region="eu-west-1")
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "eu-west-1" and path == "b/k/x.tar"


# ---- S3 (moto server) ------------------------------------------------------------------

def test_s3_round_trip(source, s3_bucket, moto_s3):
    import pyarrow.fs as pafs

    src, labels = source
    out = f"{s3_bucket}/corpus/shards"
    manifest = build(src, out, labels, max_samples=3)
    assert len(manifest["shards"]) == 3
    assert verify_shards(out) == []

    urls = shards.shard_urls(out)
    assert urls == [f"{out}/{s['name']}" for s in manifest["shards"]]
    assert storage.list_files(out) == urls
    assert storage.list_files(s3_bucket) == urls               # whole bucket
    with pytest.raises(FileNotFoundError):
        storage.list_files(f"{s3_bucket}/corpus/sha")           # not a string prefix
    assert storage.list_files(urls[1]) == [urls[1]]             # one object

    # What Ray Data does: read the shards through pyarrow's S3 filesystem.
    fs, path = storage.pyarrow_filesystem(urls[0])
    assert isinstance(fs, pafs.S3FileSystem) and path == urls[0][len("s3://"):]
    with fs.open_input_stream(path) as stream:
        via_arrow = list(iter_samples(stream, urls[0]))
    with storage.open_input(urls[0]) as stream:
        via_boto = list(iter_samples(stream, urls[0]))
    assert via_arrow == via_boto and len(via_arrow) == 3
    assert all(sorted(m) == ["flac", "json"] for _, m in via_arrow)

    # Re-running against S3 skips the complete shards.
    again = build(src, out, labels, max_samples=3)
    assert again["shards"] == manifest["shards"]

    # A corrupted object is caught by verify.
    data = bytearray(storage.read_bytes(urls[2]))
    data[-5000] ^= 0xFF
    storage.write_bytes(urls[2], bytes(data))
    problems = verify_shards(out)
    assert [p.shard for p in problems] == [urls[2]]


def test_s3_missing_things_fail_fast_naming_them(s3_bucket, moto_s3):
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/no/such.tar"):
        storage.read_bytes(f"{s3_bucket}/no/such.tar")
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nothing/here"):
        storage.list_files(f"{s3_bucket}/nothing/here")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-x"):
        storage.list_files("s3://no-such-bucket-x/shards")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-x"):
        shards.shard_urls("s3://no-such-bucket-x/shards")
    assert not storage.exists(f"{s3_bucket}/nope")
    assert time.monotonic() - t0 < 5  # permanent errors are not retried


def test_s3_prefix_is_a_folder_not_a_string_prefix(s3_bucket, moto_s3):
    storage.write_bytes(f"{s3_bucket}/shards/a.tar", make_tar([]))
    storage.write_bytes(f"{s3_bucket}/shards2/b.tar", make_tar([]))
    assert storage.list_files(f"{s3_bucket}/shards") == [f"{s3_bucket}/shards/a.tar"]
    assert storage.list_files(f"{s3_bucket}/shards*/*.tar") == [
        f"{s3_bucket}/shards/a.tar", f"{s3_bucket}/shards2/b.tar"]


class CuttingProxy:
    """TCP proxy to the S3 server that cuts its first connection after ``cut`` bytes."""

    def __init__(self, upstream_port: int, cut: int):
        self.upstream_port, self.cut = upstream_port, cut
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut if self.connections == 1 else None
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    break  # connection reset mid-body
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.server.close()


def test_s3_read_resumes_after_a_connection_reset(s3_bucket, moto_s3):
    """Reliability matrix row 8: a reset mid-object loses no bytes and does not fail."""
    payload = np.random.default_rng(0).bytes(600_000)
    url = f"{s3_bucket}/big.bin"
    storage.write_bytes(url, payload)
    proxy = CuttingProxy(int(moto_s3.rsplit(":", 1)[1]), cut=100_000)
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        with storage.open_input(url, endpoint_url=endpoint) as stream:
            got = stream.read()
        assert got == payload
        assert proxy.connections >= 2  # it really was cut and reopened
    finally:
        proxy.close()
