"""Throughput paths are correct: seek decoding, the node-local PCM cache, collision accounting.

Speed is measured in benchmarks/, never asserted here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from cola_ray.data import audio, cache, pipeline
from cola_ray.config import DataConfig

RATE = 16000
SEG = 15600

FORMATS = [("flac", "FLAC", "PCM_16"), ("wav", "WAV", "PCM_16"), ("ogg", "OGG", "VORBIS")]


def clip(seconds: float = 3.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * (220 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.shape[0])
    wave *= np.linspace(0.2, 1.0, t.shape[0])  # not stationary: the seek norm is an estimate
    return np.stack([wave, -0.5 * wave], axis=1)[:, :channels].astype(np.float32)


def encode(wave: np.ndarray, fmt: str, subtype: str, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def write_shard(path, clips: dict[str, tuple[str, bytes]]) -> str:
    """A WebDataset tar: ``<key>.<suffix>`` + ``<key>.json`` per clip."""
    with tarfile.open(path, "w") as tar:
        for key, (suffix, data) in clips.items():
            for name, payload in ((f"{key}.{suffix}", data), (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


# ---- seek ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix,fmt,subtype", FORMATS)
@pytest.mark.parametrize("channels", [1, 2])
def test_seek_gives_the_same_crops_as_full_decode(suffix, fmt, subtype, channels):
    data = encode(clip(channels=channels), fmt, subtype)
    wave, _, _ = audio.decode_audio(data, RATE)
    full = [audio.crop_pair(wave, SEG, rng, l2_normalize=False, noise_std=0.01)
            for rng in [np.random.default_rng(7)] for _ in range(3)]
    seek = audio.seek_crop_pairs(data, SEG, np.random.default_rng(7), k=3, l2_normalize=False, noise_std=0.01)
    assert len(seek) == 3
    for (fa, fp), (sa, sp) in zip(full, seek):
        np.testing.assert_array_equal(sa, fa)
        np.testing.assert_array_equal(sp, fp)


def test_seek_l2_normalize_keeps_the_crops_and_estimates_the_norm():
    data = encode(clip(), "FLAC", "PCM_16")
    wave, _, _ = audio.decode_audio(data, RATE)
    (fa, fp), = [audio.crop_pair(wave, SEG, np.random.default_rng(3))]
    (sa, sp), = audio.seek_crop_pairs(data, SEG, np.random.default_rng(3))
    # Same samples up to one gain per clip (the norm is estimated from the frames read).
    gain = float(sa @ fa) / float(fa @ fa)
    np.testing.assert_allclose(sa, gain * fa, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(sp, gain * fp, rtol=1e-4, atol=1e-7)
    assert 0.5 < gain < 2.0
    # The estimate: 2 crops of n frames carry 2n / T of the clip's energy.
    energy = (float(sa.astype(np.float64) @ sa) + float(sp.astype(np.float64) @ sp)) * wave.shape[0] / (2 * SEG)
    assert energy == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("case", ["opus", "other_rate", "short"])
def test_seek_falls_back_to_full_decode_where_it_cannot_be_exact(case):
    if case == "opus":
        data = encode(clip(), "OGG", "OPUS", rate=48000)  # not sample-exact on seek: full decode
    elif case == "other_rate":
        data = encode(clip()[::2], "FLAC", "PCM_16", rate=8000)  # needs resampling
    else:
        data = encode(clip(seconds=0.5), "WAV", "PCM_16")  # shorter than a segment: padded
    wave, _, _ = audio.decode_audio(data, RATE)
    for l2 in (True, False):  # the fallback is the full path: also its normalisation
        full = audio.crop_pair(wave, SEG, np.random.default_rng(1), l2_normalize=l2)
        (sa, sp), = audio.seek_crop_pairs(data, SEG, np.random.default_rng(1), l2_normalize=l2)
        np.testing.assert_array_equal(sa, full[0])
        np.testing.assert_array_equal(sp, full[1])


def test_seek_reports_bad_samples_like_decode():
    with pytest.raises(audio.BadSample) as e:
        audio.seek_crop_pairs(b"not audio at all" * 10, SEG, np.random.default_rng(0))
    assert e.value.reason == "decode_error"
    with pytest.raises(audio.BadSample) as e:
        audio.seek_crop_pairs(b"", SEG, np.random.default_rng(0))
    assert e.value.reason == "empty"


def test_decode_and_crop_seek_matches_full_per_seed(tmp_path):
    url = write_shard(tmp_path / "s.tar", {f"c{i}": ("flac", encode(clip(seed=i), "FLAC", "PCM_16"))
                                           for i in range(3)})
    base = dict(dataclasses.asdict(DataConfig(clip_l2_normalize=False, pairs_per_clip=2)))
    full = list(pipeline.decode_and_crop({"shard": url, "seed": 5}, base))
    seek = list(pipeline.decode_and_crop({"shard": url, "seed": 5}, {**base, "decode": "seek"}))
    assert len(full) == len(seek) == 6
    for f, s in zip(full, seek):
        np.testing.assert_array_equal(f["anchor"], s["anchor"])
        np.testing.assert_array_equal(f["positive"], s["positive"])
        assert f["clip_id"] == s["clip_id"]


def test_shards_build_stores_each_clips_sum_of_squares_and_seek_then_normalises_exactly(tmp_path):
    """Shards from ``shards build`` carry every clip's sum of squares in its json, exactly the
    full decode's: with it, decode=seek gives the full decode's model input bit for bit (L2
    normalisation on), on both transports, reading only the crops."""
    from cola_ray.data import shards

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # float WAV sources, not stationary: the estimate would differ
        sf.write(src / f"c{i}.wav", clip(seconds=3.0, seed=i), RATE, subtype="FLOAT")
    shards.build_shards(src, tmp_path / "shards", max_samples=8, progress=False)
    (url,) = [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))]
    with open(url, "rb") as f:
        samples = [members for _, members in shards.iter_samples(f, "s")]
    for members in samples:
        wave, _, _ = audio.decode_audio(members["flac"], RATE)
        assert json.loads(members["json"])[audio.SUM_SQUARES_KEY] == audio._sum_squares(wave)  # the full path's
    base = dataclasses.asdict(DataConfig(pairs_per_clip=2, block_pairs=4))
    for transport in ("float32", "int16"):
        fa, fp = _model_inputs(url, {**base, "transport": transport})
        sa, sp = _model_inputs(url, {**base, "transport": transport, "decode": "seek"})
        assert fa.shape == (6, SEG) and torch.equal(sa, fa) and torch.equal(sp, fp), transport
    # Without the stored sum (a shard made elsewhere) seek estimates the norm: same crops, another gain.
    data = samples[0]["flac"]
    (ea, _), = audio.seek_crop_pairs(data, SEG, np.random.default_rng(1))
    (xa, _), = audio.seek_crop_pairs(data, SEG, np.random.default_rng(1),
                                     sum_squares=audio._sum_squares(audio.decode_audio(data, RATE)[0]))
    (full, _) = audio.crop_pair(audio.decode_audio(data, RATE)[0], SEG, np.random.default_rng(1))
    assert np.array_equal(xa, full) and not np.array_equal(ea, full)


def test_int16_reads_are_the_float_reads_times_32768():
    """decode_audio(pcm16=True) and seek's int16 crops: 16-bit mono sources only, exactly."""
    for fmt in ("FLAC", "WAV"):
        data = encode(clip(seed=2), fmt, "PCM_16")
        pcm, _, _ = audio.decode_audio(data, RATE, pcm16=True)
        wave, _, _ = audio.decode_audio(data, RATE)
        assert pcm.dtype == np.int16 and np.array_equal(pcm.astype(np.float32) / 32768, wave)
        pairs, gain = audio.crop_pcm_pairs(pcm, SEG, np.random.default_rng(4), k=2)
        floats = [audio.crop_pair(wave, SEG, rng) for rng in [np.random.default_rng(4)] for _ in range(2)]
        for (a, p), (fa, fp) in zip(pairs, floats):
            assert np.array_equal((a.astype(np.float32) * np.float32(2.0 ** -15)) * gain, fa)
            assert np.array_equal((p.astype(np.float32) * np.float32(2.0 ** -15)) * gain, fp)
        seek_gains: list = []
        crops = audio.seek_crop_pairs(data, SEG, np.random.default_rng(4), k=2, pcm16=True, gains=seek_gains)
        floats = audio.seek_crop_pairs(data, SEG, np.random.default_rng(4), k=2)
        for (a, p), (fa, fp) in zip(crops, floats):
            assert a.dtype == np.int16
            assert np.array_equal((a.astype(np.float32) * np.float32(2.0 ** -15)) * seek_gains[0], fa)
    for other in (encode(clip(channels=2), "FLAC", "PCM_16"), encode(clip(), "FLAC", "PCM_24"),
                  encode(clip(), "WAV", "FLOAT")):
        assert audio.decode_audio(other, RATE, pcm16=True)[0].dtype == np.float32


# ---- k pairs and collisions ----------------------------------------------------------------

def test_blocks_hold_the_same_pairs_as_rows(tmp_path):
    """``read_pairs`` runs ``decode_and_crop_blocks``: the rows of ``decode_and_crop`` for
    the same seed, stacked ``block_pairs`` at a time (the last block shorter)."""
    url = write_shard(tmp_path / "s.tar", {f"c{j}": ("flac", encode(clip(seed=j), "FLAC", "PCM_16")) for j in range(4)})
    cfg = dataclasses.asdict(DataConfig(pairs_per_clip=2, block_pairs=3, transport="float32"))
    rows = list(pipeline.decode_and_crop({"shard": url, "seed": 3}, cfg))
    blocks = list(pipeline.decode_and_crop_blocks({"shard": np.array([url]), "seed": np.array([3])}, cfg))
    assert [len(b["clip_id"]) for b in blocks] == [3, 3, 2]
    for name in ("anchor", "positive", "clip_id"):
        stacked = np.concatenate([b[name] for b in blocks])
        np.testing.assert_array_equal(stacked, np.stack([r[name] for r in rows]))
    assert blocks[0]["anchor"].shape == (3, SEG) and blocks[0]["anchor"].dtype == np.float32


def test_k_pairs_come_from_the_same_clip(tmp_path):
    tones = {f"t{f}": ("wav", encode(0.5 * np.sin(2 * np.pi * f * np.arange(2 * RATE) / RATE).astype(np.float32),
                                     "WAV", "PCM_16")) for f in (300, 700, 1300)}
    url = write_shard(tmp_path / "t.tar", tones)
    rows = list(pipeline.decode_and_crop({"shard": url}, dataclasses.asdict(DataConfig(pairs_per_clip=4))))
    assert len(rows) == 12
    by_id: dict[int, set[int]] = {}
    for r in rows:
        spec = np.abs(np.fft.rfft(np.concatenate([r["anchor"], r["positive"]])))
        by_id.setdefault(r["clip_id"], set()).add(int(round(np.argmax(spec) * RATE / (2 * SEG) / 100)))
    assert len(by_id) == 3 and all(len(v) == 1 for v in by_id.values()), by_id
    assert [pipeline.clip_id(url, k) for k in tones] == list(dict.fromkeys(r["clip_id"] for r in rows))


def test_collision_rate_on_hand_made_ids():
    import torch

    assert pipeline.collision_rate([1, 2, 3, 4]) == 0.0
    assert pipeline.collision_rate([1, 1, 2, 3]) == 0.5
    assert pipeline.collision_rate([7, 7, 7, 7]) == 1.0
    assert pipeline.collision_rate([1, 2, 1, 2, 3, 4, 5, 6]) == 0.5
    assert pipeline.collision_rate([]) == 0.0
    assert pipeline.collision_rate(torch.tensor([5.0, 5.0, 6.0, 8.0])) == 0.5  # float32 batches


# ---- int16 transport --------------------------------------------------------------------------

def _model_inputs(url: str, cfg: dict, seed: int = 3) -> tuple["torch.Tensor", "torch.Tensor"]:
    """What the training loop feeds the model: blocks -> torch batches -> ``model_input``."""
    data = DataConfig(**cfg)
    dtypes = pipeline.batch_dtypes(data)
    anchors, positives = [], []
    for b in pipeline.decode_and_crop_blocks({"shard": np.array([url]), "seed": np.array([seed])}, cfg):
        batch = {k: torch.as_tensor(v, dtype=dtypes[k]) for k, v in b.items()}
        a, p = pipeline.model_input(batch)
        anchors.append(a)
        positives.append(p)
    return torch.cat(anchors), torch.cat(positives)


@pytest.mark.parametrize("path", [{}, {"decode": "seek"}, {"cache_dir": "CACHE"}, {"short_clips": "pad", "segment_samples": 60000}])
@pytest.mark.parametrize("suffix,fmt", [("flac", "FLAC"), ("wav", "WAV")])
def test_int16_transport_gives_the_float32_model_input_bit_for_bit_on_16_bit_sources(tmp_path, path, suffix, fmt):
    url = write_shard(tmp_path / "s.tar", {f"c{j}": (suffix, encode(clip(seed=j), fmt, "PCM_16")) for j in range(3)})
    path = {k: (str(tmp_path / "cache") if v == "CACHE" else v) for k, v in path.items()}
    base = dataclasses.asdict(DataConfig(pairs_per_clip=2, block_pairs=4, **path))
    for _ in range(2 if path.get("cache_dir") else 1):  # the cache: a miss, then a hit
        a32, p32 = _model_inputs(url, {**base, "transport": "float32"})
        a16, p16 = _model_inputs(url, {**base, "transport": "int16"})
        assert a32.dtype == a16.dtype == torch.float32 and a16.shape == (6, base["segment_samples"])
        assert torch.equal(a16, a32) and torch.equal(p16, p32)
    blocks = list(pipeline.decode_and_crop_blocks({"shard": np.array([url]), "seed": np.array([3])}, base))
    assert blocks[0]["anchor"].dtype == np.int16  # half the bytes of float32 pairs
    assert blocks[0]["anchor"].nbytes * 2 == a32[:4].numpy().nbytes


@pytest.mark.parametrize("subtype,channels,rate", [("PCM_24", 1, RATE), ("FLOAT", 1, RATE), ("PCM_16", 2, RATE),
                                                   ("PCM_16", 1, 22050)])
def test_int16_transport_rounds_other_sources_within_the_bound_and_counts_them(tmp_path, monkeypatch, subtype,
                                                                              channels, rate):
    """24-bit / float sources, down-mixed stereo, resampled clips: off by at most ~half a step
    x the gain (0.502: the rounding is done in float32), every such pair counted as ``lossy``."""
    fmt = "WAV" if subtype == "FLOAT" else "FLAC"
    url = write_shard(tmp_path / "s.tar", {f"c{j}": ("flac" if fmt == "FLAC" else "wav",
                                                    encode(clip(seed=j, channels=channels), fmt, subtype, rate))
                                          for j in range(3)})
    base = dataclasses.asdict(DataConfig(pairs_per_clip=2, block_pairs=4))
    a32, p32 = _model_inputs(url, {**base, "transport": "float32"})
    a16, p16 = _model_inputs(url, {**base, "transport": "int16"})
    gain = torch.as_tensor(np.concatenate([b["gain"] for b in pipeline.decode_and_crop_blocks(
        {"shard": np.array([url]), "seed": np.array([3])}, base)]))[:, None]
    bound = 0.502 * 2.0 ** -15 * gain + torch.finfo(torch.float32).eps * a32.abs()
    assert ((a16 - a32).abs() <= bound).all() and ((p16 - p32).abs() <= bound).all()
    assert not torch.equal(a16, a32)
    reported = []
    monkeypatch.setattr(pipeline.ray, "get", lambda ref, timeout=None: None)
    method = lambda f: type("Method", (), {"remote": staticmethod(f)})  # noqa: E731  (an actor method's .remote)
    counter = type("Counter", (), {"add": method(lambda *a: reported.append(a)), "quarantined": method(lambda *a: "")})
    list(pipeline.decode_and_crop_blocks({"shard": np.array([url]), "seed": np.array([3])}, base, counter))
    assert reported[0][5] == 6  # SampleCounter.add(shard, good, bad, error, refused, lossy)


def test_int16_transport_refuses_positive_noise():
    from cola_ray.config import Config, ConfigError

    with pytest.raises(ValueError, match="transport=float32"):
        pipeline.check_transport(DataConfig(positive_noise_std=0.001))
    pipeline.check_transport(DataConfig(positive_noise_std=0.001, transport="float32"))
    with pytest.raises(ConfigError, match="transport"):
        Config.from_dict({"data": {"positive_noise_std": 0.001}}).validate()
    with pytest.raises(ConfigError, match="transport"):
        Config.from_dict({"data": {"transport": "int8"}}).validate()


def test_clip_ids_are_exact_in_float32():
    ids = [pipeline.clip_id("shard-000001.tar", f"k{i}") for i in range(1000)]
    assert all(0 <= i < 2 ** 24 for i in ids)
    assert np.array_equal(np.asarray(ids, dtype=np.float32).astype(np.int64), ids)


# ---- cache -----------------------------------------------------------------------------------

def test_quantise_is_lossless_for_16_bit_sources_and_bounded_otherwise():
    wave, _, _ = audio.decode_audio(encode(clip(), "FLAC", "PCM_16"), RATE)
    pcm, q = cache.quantise(wave)
    np.testing.assert_array_equal(cache.dequantise(pcm, q), wave)
    loud = np.array([0.0, 0.25, -2.0, 1.5], dtype=np.float32)
    pcm, q = cache.quantise(loud)
    assert np.abs(cache.dequantise(pcm, q) - loud).max() <= 0.5 / q + 1e-7


def _cfg(tmp_path, **kw) -> dict:
    return dataclasses.asdict(DataConfig(cache_dir=str(tmp_path / "cache"), pairs_per_clip=2, **kw))


@pytest.mark.parametrize("suffix,fmt,subtype", [("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS")])
def test_cache_hit_returns_the_miss_samples(tmp_path, suffix, fmt, subtype):
    url = write_shard(tmp_path / "s.tar", {f"c{i}": (suffix, encode(clip(seed=i), fmt, subtype)) for i in range(3)})
    cfg = _cfg(tmp_path, positive_noise_std=0.001)
    miss = list(pipeline.decode_and_crop({"shard": url, "seed": 11}, cfg))
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    hit = list(pipeline.decode_and_crop({"shard": url, "seed": 11}, cfg))
    assert len(miss) == len(hit) == 6
    for m, h in zip(miss, hit):
        np.testing.assert_array_equal(m["anchor"], h["anchor"])
        np.testing.assert_array_equal(m["positive"], h["positive"])
        assert m["clip_id"] == h["clip_id"]
    # Against the streaming (float) path: identical for 16-bit FLAC, within int16 rounding for Vorbis.
    stream = list(pipeline.decode_and_crop({"shard": url, "seed": 11}, {**cfg, "cache_dir": ""}))
    tol = 0.0 if suffix == "flac" else 1 / 32768
    for s, h in zip(stream, hit):
        scale = float(np.linalg.norm(s["anchor"])) or 1.0  # crops are L2-normalised by the clip norm
        assert np.abs(s["anchor"] - h["anchor"]).max() <= tol * scale * 40 + 1e-9
    if suffix == "flac":
        for s, h in zip(stream, hit):
            np.testing.assert_array_equal(s["anchor"], h["anchor"])


def test_cache_keeps_bad_sample_counts_and_keys_on_shard_content(tmp_path):
    clips = {f"c{i}": ("flac", encode(clip(seed=i), "FLAC", "PCM_16")) for i in range(2)}
    url = write_shard(tmp_path / "s.tar", {**clips, "broken": ("flac", b"garbage" * 20)})
    c = cache.ShardCache(tmp_path / "cache", 1 << 30)
    cfg = _cfg(tmp_path)
    tallies = []
    for _ in range(2):  # miss, then hit: the same counts
        tally = pipeline.ShardTally("s.tar")
        list(pipeline._pairs({"shard": url}, DataConfig(**cfg), tally, np.random.default_rng(0)))
        tallies.append(dict(tally.bad))
    assert tallies == [{"decode_error": 1}, {"decode_error": 1}]
    v1 = pipeline._shard_version({"shard": url}, DataConfig(**cfg))
    assert c.open(c.entry_name(url, v1)) is not None
    # The shard changes (rebuilt with other clips): another entry, never the stale one.
    write_shard(tmp_path / "s.tar", {"other": ("flac", encode(clip(seed=9, seconds=4.0), "FLAC", "PCM_16"))})
    os.utime(url, ns=(1, 1))
    v2 = pipeline._shard_version({"shard": url}, DataConfig(**cfg))
    assert v2 != v1 and c.entry_name(url, v2) != c.entry_name(url, v1)
    rows = list(pipeline.decode_and_crop({"shard": url}, cfg))
    assert {r["clip_id"] for r in rows} == {pipeline.clip_id(url, "other")}
    # Manifest versions (sha256 + size) key the entry when read_pairs found them.
    assert pipeline._shard_version({"shard": url, "sha256": "ab", "bytes": 3}, DataConfig(**cfg)) == "sha256=ab bytes=3"


def test_cache_eviction_bounds_bytes_lru(tmp_path):
    urls = [write_shard(tmp_path / f"s{i}.tar", {"c": ("flac", encode(clip(seed=i), "FLAC", "PCM_16"))})
            for i in range(4)]
    one = 3 * RATE * 2  # a 3 s clip in int16
    cfg = _cfg(tmp_path, cache_max_bytes=int(2.5 * one) + 4096)
    c = cache.ShardCache(cfg["cache_dir"], cfg["cache_max_bytes"])

    def name(url: str) -> str:
        return c.entry_name(url, pipeline._shard_version({"shard": url}, DataConfig(**cfg)))

    for i, url in enumerate(urls):
        list(pipeline.decode_and_crop({"shard": url}, cfg))
        os.utime(c.root / f"{name(url)}.json", (1000 + i, 1000 + i))  # distinct recencies
        if i == 1:  # a hit on s0 makes s1 the least recently used
            assert c.open(name(urls[0])) is not None
        assert c.total_bytes() <= cfg["cache_max_bytes"]
    kept = {u for u in urls if c.open(name(u)) is not None}
    assert kept == {urls[0], urls[3]}
    # An entry bigger than the bound on its own is not kept.
    small = cache.ShardCache(tmp_path / "small", 1000)
    with small.writer("x") as w:
        w.add("c", clip()[:, 0])
        w.commit({})
    assert small.open("x") is None and small.total_bytes() <= 1000


def _fill(args) -> int:
    url, cfg = args
    return len(list(pipeline.decode_and_crop({"shard": url}, cfg)))


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    url = write_shard(tmp_path / "s.tar", {f"c{i}": ("flac", encode(clip(seed=i), "FLAC", "PCM_16")) for i in range(4)})
    cfg = _cfg(tmp_path)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        assert pool.map(_fill, [(url, cfg)] * 6) == [8] * 6
    c = cache.ShardCache(cfg["cache_dir"], cfg["cache_max_bytes"])
    assert len(list(c.root.glob("*.json"))) == 1
    assert len(list(c.root.glob("*.pcm"))) == 1, "the losers' copies are removed"
    assert not list(c.root.glob("*.tmp"))
    hit = c.open(c.entry_name(url, pipeline._shard_version({"shard": url}, DataConfig(**cfg))))
    wave, _, _ = audio.decode_audio(encode(clip(seed=2), "FLAC", "PCM_16"), RATE)
    np.testing.assert_array_equal(hit.clip(hit.keys.index("c2")), wave)


# ---- one small Ray pass per path ---------------------------------------------------------------

@pytest.mark.slow
def test_read_pairs_with_seek_and_with_cache(ray_local, tmp_path):
    (tmp_path / "shards").mkdir()
    for i in range(2):
        write_shard(tmp_path / "shards" / f"shard-{i:06d}.tar",
                    {f"s{i}c{j}": ("flac", encode(clip(seed=3 * i + j), "FLAC", "PCM_16")) for j in range(3)})
    for kw in ({"decode": "seek"}, {"cache_dir": str(tmp_path / "cache")}, {"cache_dir": str(tmp_path / "cache")}):
        data = DataConfig(shards=str(tmp_path / "shards"), decode_num_cpus=0.5, pairs_per_clip=2, block_pairs=4, **kw)
        ds = pipeline.read_pairs(data)
        assert sorted(len(b["clip_id"]) for b in ds.iter_batches(batch_size=None)) == [2, 2, 4, 4], kw  # block per yield
        rows = list(ds.iter_rows())
        assert len(rows) == 12, kw
        for r in rows:
            assert r["anchor"].shape == (SEG,) and r["positive"].shape == (SEG,) and r["anchor"].dtype == np.int16  # data.transport=int16
        assert len({r["clip_id"] for r in rows}) == 6
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_a_disk_error_costs_the_cache_entry_not_the_run(tmp_path, monkeypatch):
    url = write_shard(tmp_path / "s.tar", {f"c{i}": ("flac", encode(clip(seed=i), "FLAC", "PCM_16")) for i in range(2)})
    cfg = _cfg(tmp_path)
    real_write = cache.EntryWriter.add

    class FullDisk(io.RawIOBase):
        def write(self, data):
            raise OSError(28, "No space left on device")

    def full_disk(self, key, wave):
        if not isinstance(self._f, FullDisk):
            self._f.close()
            self._f = FullDisk()
        return real_write(self, key, wave)

    monkeypatch.setattr(cache.EntryWriter, "add", full_disk)
    rows = list(pipeline.decode_and_crop({"shard": url, "seed": 1}, cfg))
    monkeypatch.undo()
    assert len(rows) == 4
    assert not list((tmp_path / "cache").glob("*.json")) and not list((tmp_path / "cache").glob("*.tmp"))
    again = list(pipeline.decode_and_crop({"shard": url, "seed": 1}, cfg))  # a miss again: same pairs
    for a, b in zip(rows, again):
        np.testing.assert_array_equal(a["anchor"], b["anchor"])
