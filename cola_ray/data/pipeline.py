"""Ray Data: shards -> decode_and_crop -> rows of waveform pairs.

Data workers only read, decode and crop. They never compute features: log-mel runs
on the training device (on GPU nodes, CPU log-mel would cost ~8 cores per GPU).

    shard urls --(random order each epoch)--> decode_and_crop_blocks (Ray tasks, one per shard)
        --> blocks of rows {"anchor", "positive": int16 (S,) + "step", "gain": float32 (data.transport=int16;
            float32 (S,) pairs with transport=float32), "clip_id": int (24-bit),
            "shard_idx", "sample_idx": int (the clip, exactly: exactly-once epochs)},
            ``data.block_pairs`` rows stacked per block
        --> streaming_split across Ray Train workers --> iter_torch_batches

Every resource a data task asks for is set here. Bad samples are skipped and counted
by reason in a :class:`SampleCounter` actor; training workers read it to log the counts
and to enforce the error budget.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import zlib
from typing import Any, Callable, Iterator

import numpy as np
import ray

from cola_ray.data import audio, shards, storage
from cola_ray.config import DataConfig


@ray.remote(num_cpus=0)
class SampleCounter:
    """Good / bad sample tallies of one run, fed by every decode task, and the run's
    quarantine: shards set aside for the rest of the run (see :func:`quarantine_reason`)."""

    def __init__(self) -> None:
        self.good = 0
        self.bad: collections.Counter[str] = collections.Counter()
        self.bad_by_shard: collections.Counter[str] = collections.Counter()
        self.bad_shards: dict[str, str] = {}
        self.refused: collections.Counter[str] = collections.Counter()
        self.lossy = 0
        self.quarantine: dict[str, dict[str, str]] = {}  # shard -> {"reason", "version"}
        self.reads: collections.Counter[str] = collections.Counter()  # reads of each shard
        self.skipped = 0  # reads of quarantined shards not made

    def add(self, shard: str, good: int, bad: dict[str, int], shard_error: str = "",
            refused: dict[str, int] | None = None, lossy: int = 0, version: str = "") -> None:
        self.good += good
        self.lossy += lossy
        self.reads[shard] += 1
        self.bad.update(bad)
        self.bad_by_shard[shard] += sum(bad.values())
        if shard_error:
            self.bad_shards[shard] = shard_error
            self.quarantine[shard] = {"reason": shard_error, "version": version}
        self.refused.update(refused or {})

    def quarantined(self, shard: str, version: str) -> str:
        """Why ``shard`` is quarantined, or "" if it is not or its manifest entry has changed
        since (then it leaves the quarantine and is read again)."""
        entry = self.quarantine.get(shard)
        if entry is None:
            return ""
        if entry["version"] != version:
            del self.quarantine[shard]
            self.bad_shards.pop(shard, None)
            return ""
        self.skipped += 1
        return entry["reason"]

    def restore(self, quarantine: dict[str, dict[str, str]]) -> None:
        """Take over a resumed run's quarantine (from its checkpoint): those shards stay
        named and counted once (``bad_shard``), and are not read again."""
        for shard, entry in quarantine.items():
            if shard not in self.quarantine:
                self.quarantine[shard] = dict(entry)
                self.bad_shards[shard] = entry["reason"]
                self.bad["bad_shard"] += 1
                self.bad_by_shard[shard] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "good": self.good,
            "bad": dict(self.bad),
            "worst_shards": self.bad_by_shard.most_common(5),
            "bad_shards": dict(self.bad_shards),
            "refused": dict(self.refused),
            "int16_lossy_pairs": self.lossy,
            "quarantine": {k: dict(v) for k, v in self.quarantine.items()},
            "shard_reads": dict(self.reads),
            "quarantine_skips": self.skipped,
        }


@ray.remote(num_cpus=0)
class EpochLedger:
    """What the epoch in progress reads: its crops' entropy, a function of (``seed``, epoch,
    shard), and what it must not deliver again: per shard file name, the ordinals of the
    clips a resumed run had already trained on in this epoch (restored from the checkpoint
    by the training workers, :mod:`cola_ray.train.epochs`). World rank 0 sets it before each
    epoch's pass (nothing to skip for a fresh epoch); every decode task asks once, for its
    shard, before it yields anything. So a resumed epoch's rest is cut exactly as the
    uninterrupted epoch would have cut it, and a retried decode task repeats its crops."""

    def __init__(self, seed: int = 0) -> None:
        self.seed, self.epoch = int(seed), -1
        self.skip: dict[str, np.ndarray] = {}

    def begin(self, epoch: int, skip: dict[str, np.ndarray]) -> None:
        self.epoch, self.skip = epoch, dict(skip)

    def read_plan(self, shard: str) -> tuple[list[int], np.ndarray | None]:
        """(crop entropy, ordinals to skip) for the shard named ``shard`` in this epoch."""
        return [self.seed, self.epoch, zlib.crc32(shard.encode())], self.skip.get(shard)


def _read_plan(row: dict[str, Any], ledger: Any | None) -> tuple[np.random.Generator, frozenset[int]]:
    """The crop generator and the ordinals to leave out for the read of ``row["shard"]``:
    ``row["seed"]`` if given (tests, benchmarks), else the ledger's (seed, epoch, shard),
    else fresh entropy (no ledger: every read draws new crops)."""
    entropy, found = None, None
    if ledger is not None:
        entropy, found = ray.get(ledger.read_plan.remote(os.path.basename(row["shard"])))
    seed = row.get("seed")
    rng = np.random.default_rng(entropy if seed is None else seed)
    return rng, frozenset() if found is None else frozenset(int(i) for i in found)


class ErrorBudgetExceeded(RuntimeError):
    """More bad samples than ``data.max_bad_fraction`` allows."""


def check_budget(snapshot: dict[str, Any], cfg: DataConfig) -> None:
    """Raise :class:`ErrorBudgetExceeded` naming the worst shards once past the budget."""
    bad = sum(snapshot["bad"].values())
    seen = bad + snapshot["good"]
    if seen < cfg.min_samples_for_budget or bad <= cfg.max_bad_fraction * seen:
        return
    worst = ", ".join(f"{name} ({n} bad)" for name, n in snapshot["worst_shards"] if n)
    broken = "; ".join(f"{k}: {v}" for k, v in snapshot["bad_shards"].items())
    raise ErrorBudgetExceeded(
        f"{bad} of {seen} samples were bad ({bad / seen:.1%} > data.max_bad_fraction="
        f"{cfg.max_bad_fraction:.1%}); by reason {snapshot['bad']}; worst shards: {worst}"
        + (f"; unreadable shards: {broken}" if broken else "")
    )


@dataclasses.dataclass
class ShardTally:
    """Good and bad samples of one read of one shard, sent to a :class:`SampleCounter`."""

    shard: str
    good: int = 0
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    error: str = ""
    lossy: int = 0  # pairs the int16 transport could not carry exactly (see encode_int16)
    version: str = ""  # the shard's manifest entry (or size) when read: what a quarantine sticks to
    # Members skipped unread although the sample was used: pickle-format ones are worth a look.
    refused: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def report(self, counter: Any | None) -> None:
        """Add this read's tallies to the run's counter before the task ends (so a reader of
        the counter never sees a finished shard uncounted); a lost counter only loses counts."""
        if counter is None:
            return
        try:
            ray.get(counter.add.remote(self.shard, self.good, dict(self.bad), self.error, dict(self.refused),
                                       self.lossy, self.version), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            logging.getLogger(__name__).warning("could not count shard %s: %s", self.shard, e)


def shard_samples(
    url: str, tally: ShardTally, *, endpoint_url: str = "", region: str = "",
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of one shard as ``(key, members)``, checked against its manifest.

    A shard listed in the ``manifest.json`` beside it is checked while it streams (size up
    front, then bytes, sample count and sha256; see ``shards.iter_samples``); shards made
    elsewhere, without a manifest, get the tar-level checks only. A shard that fails is
    *quarantined*: reading stops, it is counted once (``tally.bad["bad_shard"]``), named in
    ``tally.error`` (the run's counter keeps it under ``bad_shards``) and in a warning in the
    task's log. Samples it yielded before the failure were whole: a truncated shard whose
    size is known (local files, S3) yields none, one cut mid-stream yields only samples read
    in full, the sample being read when the bytes ran out is never yielded. An altered shard
    of the right size is only caught at its end, after the samples before the alteration.
    The run's :class:`SampleCounter` keeps it quarantined: later reads (next epochs, a
    resume) skip it, unread and uncounted, until its manifest entry changes
    (:func:`quarantine_reason`). Hostile keys are counted by
    reason; members outside the allowlist are skipped unread, pickle-format ones counted in
    ``tally.refused``. S3 403/404 errors are not quarantined: they propagate, naming the object.
    """
    refused: collections.Counter[str] = collections.Counter()
    try:
        expected = shards.manifest_entry(url, endpoint_url, region)
        with storage.open_input(url, endpoint_url=endpoint_url, region=region) as stream:
            for item in shards.iter_samples(stream, tally.shard, expected=expected, ignored=refused):
                if isinstance(item, audio.BadSample):
                    tally.bad[item.reason] += 1
                    continue
                yield item
    except shards.ShardError as e:
        tally.bad["bad_shard"] += 1
        tally.error = str(e)  # "shard <name>: <detail>"; `cola-ray shards verify` prints the same detail
        logging.getLogger(__name__).warning("quarantined shard %s: %s", url, e.detail)
    finally:
        if refused["pickle_member"]:
            tally.refused["pickle_member"] += refused["pickle_member"]
            logging.getLogger(__name__).warning(
                "shard %s: %d pickle-format members refused (never read)", url, refused["pickle_member"])


def decoded_clips(
    url: str, sample_rate: int, tally: ShardTally, *, endpoint_url: str = "", region: str = "",
    keep: Callable[[dict[str, Any]], bool] | None = None, pcm16: bool = False,
) -> Iterator[tuple[str, dict[str, Any], np.ndarray]]:
    """Every usable clip of one shard: ``(key, json metadata, mono float32 wave (T,))``
    (with ``pcm16``, int16 samples for 16-bit mono sources at ``sample_rate``: :func:`audio.decode_audio`).

    The one place shards become audio, for pre-training and downstream alike. Shards are
    read through :func:`shard_samples` (checked against their manifest; a bad shard is
    quarantined: counted once as ``bad_shard`` and named in ``tally.error``). Samples
    that cannot be used are skipped and counted in ``tally.bad`` by reason.
    ``keep(meta)`` filters samples before their audio is decoded. Callers count
    ``tally.good`` themselves, once a clip has really been used.
    """
    for key, members in shard_samples(url, tally, endpoint_url=endpoint_url, region=region):
        try:
            meta = shards.sample_meta(members, key)  # a malformed json makes the sample bad
            if keep is not None and not keep(meta):
                continue
            _, raw = audio.audio_member(members, key)
            wave, _, _ = audio.decode_audio(raw, sample_rate, name=key, pcm16=pcm16)
        except audio.BadSample as e:
            tally.bad[e.reason] += 1
            continue
        yield key, meta, wave


def raw_clips(
    url: str, tally: ShardTally, *, endpoint_url: str = "", region: str = "",
) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Every sample of one shard with an audio member: ``(key, json metadata, audio bytes)``.

    :func:`decoded_clips` without the decode, for paths that decode only part of a clip
    (``data.decode="seek"``): the same :func:`shard_samples` reading and checks, bad
    samples counted the same way; decode errors are the caller's to count.
    """
    for key, members in shard_samples(url, tally, endpoint_url=endpoint_url, region=region):
        try:
            meta = shards.sample_meta(members, key)
            _, raw = audio.audio_member(members, key)
        except audio.BadSample as e:
            tally.bad[e.reason] += 1
            continue
        yield key, meta, raw


CLIP_ID_BITS = 24
"""Clip ids are 24-bit so they survive ``iter_torch_batches(dtypes=torch.float32)`` exactly."""


def clip_id(shard: str, key: str) -> int:
    """A 24-bit hash of (shard file name, sample key): which clip a pair came from.

    24 bits because training batches are float32 (exact integers up to 2^24). Two clips
    share an id with probability 2^-24, so :func:`collision_rate` has a floor of about
    (B - 1) / 2^24 per pair (6e-5 at B = 1024) from ids alone.
    """
    digest = hashlib.blake2b(f"{os.path.basename(shard)}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << CLIP_ID_BITS) - 1)


def collision_rate(clip_ids: Any) -> float:
    """Fraction of the pairs in one batch whose clip gives at least one other pair of the batch.

    ``clip_ids``: (B,) ids (numpy, torch or a list). ``[1, 1, 2, 3]`` -> 0.5 (both pairs of
    clip 1 collide), ``[1, 2, 3, 4]`` -> 0.0, ``[7, 7, 7, 7]`` -> 1.0. A colliding pair's
    twin is one of its negatives although it comes from the same clip (a false negative),
    which ``pairs_per_clip > 1`` makes possible; the training loop logs the mean over a
    logging window as ``data/collision_rate``. 0.0 for an empty batch.
    """
    ids = np.asarray(clip_ids.cpu() if hasattr(clip_ids, "cpu") else clip_ids).reshape(-1)
    if ids.size == 0:
        return 0.0
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).mean())


def shard_clips(
    row: dict[str, Any], data: DataConfig, counter: Any | None, ledger: Any | None, pcm: bool = False,
) -> Iterator[tuple[int, int, list[tuple[np.ndarray, np.ndarray]], np.float32, np.float32 | None, ShardTally]]:
    """``(ordinal, clip_id, k pairs, gain, step, tally)`` for every clip of ``row["shard"]``
    this read delivers (:func:`_pairs` gives the rest): nothing for a quarantined shard,
    the ledger's clips left out, the shard's tally reported when the read ends, however."""
    tally = ShardTally(os.path.basename(row["shard"]))
    if quarantine_reason(row["shard"], tally, data, counter):
        return
    rng, skip = _read_plan(row, ledger)
    try:
        for ordinal, (key, pairs, gain, step) in enumerate(_pairs(row, data, tally, rng, pcm=pcm)):
            if ordinal in skip:  # trained on before the resume, in this same epoch
                continue
            yield ordinal, clip_id(row["shard"], key), pairs, gain, step, tally
            tally.good += 1
    finally:
        if tally.lossy:
            logging.getLogger(__name__).warning(
                "shard %s: %d pairs are not 16-bit PCM (24-bit / float source, resampled or down-mixed); "
                "int16 transport rounded them by at most half an int16 step x the clip's gain "
                "(data.transport=float32 keeps them exact)", tally.shard, tally.lossy)
        tally.report(counter)


def decode_and_crop(
    row: dict[str, Any], cfg: dict[str, Any], counter: Any | None = None, ledger: Any | None = None
) -> Iterator[dict[str, Any]]:
    """One shard -> ``pairs_per_clip`` pairs per good clip: rows ``{"anchor": (S,) float32,
    "positive": (S,) float32, "clip_id": int, "shard_idx": int, "sample_idx": int}``
    (:func:`clip_id`; ``shard_idx`` = ``row["shard_index"]``, the shard's place in the run's
    shard list; ``sample_idx`` = the clip's ordinal among the shard's good clips, stable from
    read to read: together they name the clip exactly, for exactly-once epochs). With a
    ``ledger`` (:class:`EpochLedger`), the clips it lists for this shard are decoded (their
    ordinals must stay the same) but not delivered: a resumed epoch's rest.

    Runs in a Ray Data task. Three paths, chosen by ``data``:

    - ``decode="full"`` (default): decode the whole clip, :func:`audio.crop_pair` k times;
    - ``decode="seek"``: read only the crops (:func:`audio.seek_crop_pairs`);
    - ``cache_dir`` set: crops from this node's int16 PCM copy of the shard
      (:mod:`cola_ray.data.cache`); on a miss the shard is decoded fully, cached, and cropped
      from the quantised clips (so a miss and a hit give the same pairs for the same rng).

    Samples that cannot be used are skipped and counted by reason (a cache hit reports
    the counts recorded when the entry was written); a shard that cannot be read at all
    is counted once and named. ``row["seed"]``, if given, seeds the crops (tests,
    benchmarks); else the ``ledger``'s (train.seed, epoch, shard) do; without either,
    every read draws fresh crops.
    """
    shard_idx = int(row.get("shard_index", 0))
    for ordinal, cid, pairs, _, _, _ in shard_clips(row, DataConfig(**cfg), counter, ledger):
        for anchor, positive in pairs:
            yield {"anchor": anchor, "positive": positive, "clip_id": cid, "shard_idx": shard_idx,
                   "sample_idx": ordinal}


def decode_and_crop_blocks(
    batch: dict[str, np.ndarray], cfg: dict[str, Any], counter: Any | None = None, ledger: Any | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`decode_and_crop` for ``map_batches(batch_size=1)``: the shard in ``batch`` ->
    blocks of N = ``data.block_pairs`` pairs (the last one shorter), in the wire format of
    ``data.transport``:

    - ``int16`` (default): ``{"anchor", "positive": (N, S) int16, "step", "gain": (N,) float32,
      "clip_id": (N,) int64}``; the model input is ``(pcm * step) * gain`` in float32, made on
      the training device by :func:`model_input` (see :func:`encode_int16` for when it is exact);
    - ``float32``: ``{"anchor", "positive": (N, S) float32, "clip_id": (N,) int64}``, the model input;

    and in both, ``"shard_idx", "sample_idx": (N,) int64``, the clip exactly (as
    :func:`decode_and_crop`, which also says what the ``ledger`` does).

    Why blocks: a row-at-a-time ``flat_map`` cost Ray Data ~0.13 ms of CPU per pair
    (building blocks out of per-row dicts), as much as decoding when the decode is cheap
    (WAV, seek, the cache); stacked blocks cost ~0.07-0.15 ms per pair including the
    stacking copy (2-core machine, ``benchmarks/pipeline_bench.py``).
    """
    row = {name: column[0] for name, column in batch.items()}
    data = DataConfig(**cfg)
    n = data.block_pairs
    int16 = data.transport == "int16"
    shard_idx = int(row.get("shard_index", 0))
    cols: dict[str, list] = {name: [] for name in ("anchor", "positive", "clip_id", "step", "gain", "sample_idx")}

    def block() -> dict[str, np.ndarray]:
        out = {"anchor": np.stack(cols["anchor"]), "positive": np.stack(cols["positive"]),
               "clip_id": np.asarray(cols["clip_id"], np.int64),
               "shard_idx": np.full(len(cols["clip_id"]), shard_idx, np.int64),
               "sample_idx": np.asarray(cols["sample_idx"], np.int64)}
        if int16:
            out["step"] = np.asarray(cols["step"], np.float32)
            out["gain"] = np.asarray(cols["gain"], np.float32)
        for column in cols.values():
            column.clear()
        return out

    for ordinal, cid, pairs, gain, step, tally in shard_clips(row, data, counter, ledger, pcm=int16):
        for anchor, positive in pairs:
            if int16 and anchor.dtype == np.int16:  # a cache hit's own samples
                cols["step"].append(step)
                cols["gain"].append(gain)
            elif int16:
                anchor, positive, pair_step, exact = encode_int16(anchor, positive, gain, step)
                tally.lossy += not exact
                cols["step"].append(pair_step)
                cols["gain"].append(gain)
            cols["anchor"].append(anchor)
            cols["positive"].append(positive)
            cols["clip_id"].append(cid)
            cols["sample_idx"].append(ordinal)
            if len(cols["clip_id"]) == n:
                yield block()
    if cols["clip_id"]:
        yield block()


def quarantine_reason(url: str, tally: ShardTally, data: DataConfig, counter: Any | None) -> str:
    """Why the shard at ``url`` is quarantined in this run ("" if it is not): a shard that
    failed once is skipped for the rest of the run, resumes included (the checkpoint keeps
    the quarantine), until its manifest entry (sha256 + size; the file's size for a shard
    without one) changes. Sets ``tally.version`` for the read that follows. One actor call
    per shard read; without a counter (tests, benchmarks) nothing is quarantined."""
    try:
        entry = shards.manifest_entry(url, data.s3_endpoint_url, data.s3_region)
        tally.version = (f"sha256={entry['sha256']} bytes={entry['bytes']}" if entry is not None
                         else f"bytes={storage.file_size(url, data.s3_endpoint_url, data.s3_region)}")
    except (shards.ShardError, OSError):  # the read will say what is wrong
        tally.version = ""
    if counter is None:
        return ""
    try:
        reason = ray.get(counter.quarantined.remote(tally.shard, tally.version), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return ""
    if reason:
        logging.getLogger(__name__).info("skipping quarantined shard %s: %s", url, reason)
    return reason


STEP_16BIT = np.float32(2.0 ** -15)
"""The int16 step of a 16-bit source as soundfile decodes it: float sample = int16 / 32768."""


def encode_int16(
    anchor: np.ndarray, positive: np.ndarray, gain: np.float32, step: np.float32 | None = None,
) -> tuple[np.ndarray, np.ndarray, np.float32, bool]:
    """One float32 pair (each (S,), already multiplied by ``gain``) -> ``(anchor int16,
    positive int16, step, exact)`` such that ``float32(float32(pcm * step) * gain)`` is the pair.

    ``step``: the clip's int16 step where it is known (the cache's ``1 / q``); otherwise
    2^-15, the step of 16-bit sources (peak above full scale: ``peak / 32767``). ``exact``:
    the decoded pair equals the input bit for bit. It always does for 16-bit mono sources at
    the target rate (the full and seek paths) and on the cache path; for other sources
    (24-bit or float, resampled, down-mixed stereo) each sample is off by at most half a step
    times the gain, ``0.502 * 2^-15 * gain`` (1/65536 of full scale before the L2 gain, as the
    cache already rounds; 0.502 because the rounding is done in float32), plus one float32
    rounding of the sample.
    """
    known = step is not None
    if step is None:
        peak = max(float(np.abs(anchor).max()), float(np.abs(positive).max())) / float(gain)
        step = STEP_16BIT if peak <= 1.0 else np.float32(peak / 32767.0)
    inv = 1.0 / (float(step) * float(gain))
    pcm = []
    exact = True
    for x in (anchor, positive):
        q = np.clip(np.rint(x * np.float32(inv)), -32768, 32767).astype(np.int16)
        if not known:  # the cache's step recovers its samples by construction; others are checked
            exact = exact and np.array_equal((q.astype(np.float32) * step) * gain, x)
        pcm.append(q)
    return pcm[0], pcm[1], np.float32(step), exact


def model_input(batch: dict[str, Any]) -> tuple[Any, Any]:
    """A training batch from :func:`read_pairs` -> ``(anchor, positive)`` float32 (B, S) each,
    on the batch's device: int16 pairs become ``(pcm * step) * gain`` (two float32 multiplies,
    the same two roundings as the decode task's crops, hence the same bits); float32 pairs
    pass through."""
    import torch

    anchor, positive = batch["anchor"], batch["positive"]
    if anchor.dtype != torch.int16:
        return anchor, positive
    step, gain = batch["step"][:, None], batch["gain"][:, None]  # (B, 1)
    return (anchor.to(torch.float32) * step) * gain, (positive.to(torch.float32) * step) * gain


def batch_dtypes(data: DataConfig) -> dict[str, Any]:
    """``iter_torch_batches(dtypes=...)`` for :func:`read_pairs`'s columns (clip ids as float32,
    exact at 24 bits)."""
    import torch

    wave = torch.int16 if data.transport == "int16" else torch.float32
    out = {"anchor": wave, "positive": wave, "clip_id": torch.float32, "shard_idx": torch.int64,
           "sample_idx": torch.int64}
    if data.transport == "int16":
        out.update(step=torch.float32, gain=torch.float32)
    return out


def _pairs(
    row: dict[str, Any], data: DataConfig, tally: ShardTally, rng: np.random.Generator, pcm: bool = False,
) -> Iterator[tuple[str, list[tuple[np.ndarray, np.ndarray]], np.float32, np.float32 | None]]:
    """``(key, k pairs, gain, step)`` for every good clip of the shard in ``row``, by the
    configured path. ``gain``: the float32 factor the crops were multiplied by (the L2
    scale); ``step``: the clip's int16 step where it is known (cache: ``1 / q``), else None.
    With ``pcm``, cache hits and full decodes of 16-bit mono sources at the target rate give
    int16 crops unscaled (the same draws): pairs whose model input is ``(pcm * step) * gain``,
    with no float pass over them in the decode task."""
    url, k, n = row["shard"], data.pairs_per_clip, data.segment_samples
    crop = dict(l2_normalize=data.clip_l2_normalize, noise_std=data.positive_noise_std, short=data.short_clips)
    where = dict(endpoint_url=data.s3_endpoint_url, region=data.s3_region)
    one = np.float32(1.0)
    if data.cache_dir:
        from cola_ray.data.cache import ShardCache

        cache = ShardCache(data.cache_dir, data.cache_max_bytes)
        name = cache.entry_name(url, _shard_version(row, data))
        hit = cache.open(name)
        if hit is not None:
            tally.bad.update(hit.bad)
            for i, key in enumerate(hit.keys):
                try:
                    if pcm and hit.lengths[i] >= n and not data.positive_noise_std:  # the cached int16 as is
                        pairs = hit.pcm_pairs(i, n, rng, k=k)
                    else:
                        pairs = hit.crop_pairs(i, n, rng, k=k, **crop)
                except audio.BadSample as e:
                    tally.bad[e.reason] += 1
                    continue
                gain = np.float32(hit.inv_norms[i]) if data.clip_l2_normalize else one
                yield key, pairs, gain, np.float32(1.0 / hit.scales[i])
            return
        crop_bad: collections.Counter[str] = collections.Counter()  # re-counted on every hit
        with cache.writer(name) as writer:
            for key, _, wave in decoded_clips(url, data.sample_rate, tally, **where):
                clip = writer.add(key, wave)
                gains: list = []
                try:
                    pairs = [audio.crop_pair(clip, n, rng, **crop, name=key, gains=gains) for _ in range(k)]
                except audio.BadSample as e:
                    tally.bad[e.reason] += 1
                    crop_bad[e.reason] += 1
                    continue
                yield key, pairs, gains[0], np.float32(1.0 / writer.clips[-1][3])
            if not tally.error:  # a shard that broke mid-read (maybe a transient S3 error) is not kept
                writer.commit(dict(tally.bad - crop_bad))
        return
    if data.decode == "seek":
        for key, meta, raw in raw_clips(url, tally, **where):
            gains = []
            try:
                pairs = audio.seek_crop_pairs(raw, n, rng, k=k, target_rate=data.sample_rate, **crop, name=key,
                                              gains=gains, sum_squares=_stored_sum_squares(meta), pcm16=pcm)
            except audio.BadSample as e:
                tally.bad[e.reason] += 1
                continue
            yield key, pairs, gains[0], STEP_16BIT if pairs[0][0].dtype == np.int16 else None
        return
    # With pcm (int16 transport), 16-bit sources stay int16 from the decoder to the wire.
    for key, _, wave in decoded_clips(url, data.sample_rate, tally, pcm16=pcm, **where):
        gains = []
        try:
            if wave.dtype == np.int16:
                pairs, gain = audio.crop_pcm_pairs(wave, n, rng, k=k, l2_normalize=data.clip_l2_normalize,
                                                   short=data.short_clips, name=key)
                step = STEP_16BIT
            else:
                pairs = [audio.crop_pair(wave, n, rng, **crop, name=key, gains=gains) for _ in range(k)]
                gain, step = gains[0], None
        except audio.BadSample as e:
            tally.bad[e.reason] += 1
            continue
        yield key, pairs, gain, step


def _stored_sum_squares(meta: dict[str, Any]) -> float | None:
    """The clip's sum of squares from its json (``shards build`` writes it), or None: then
    the seek path estimates the clip's norm from its crops."""
    value = meta.get(audio.SUM_SQUARES_KEY)
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def _shard_version(row: dict[str, Any], data: DataConfig) -> str:
    """What identifies the shard's content for the cache: the manifest's sha256 + size when
    :func:`read_pairs` found them, else the file's size (+ mtime for a local file)."""
    if row.get("sha256"):
        return f"sha256={row['sha256']} bytes={row.get('bytes')}"
    url = row["shard"]
    size = storage.file_size(url, data.s3_endpoint_url, data.s3_region)
    mtime = os.stat(url).st_mtime_ns if not storage.is_s3(url) and os.path.exists(url) else ""
    return f"bytes={size} mtime={mtime}"


def list_shards(data: DataConfig) -> list[str]:
    """Shard URLs at ``data.shards``; raises FileNotFoundError naming the path if none."""
    urls = shards.shard_urls(data.shards, endpoint_url=data.s3_endpoint_url, region=data.s3_region)
    if not urls:
        raise FileNotFoundError(f"no *.tar shards found at {data.shards!r}")
    return urls


def read_pairs(data: DataConfig, counter: Any | None = None, urls: list[str] | None = None,
               ledger: Any | None = None) -> ray.data.Dataset:
    """The training dataset: a lazy, streaming Ray Dataset of waveform pairs.

    Executed afresh every epoch, so crops (and the shard order) change every epoch. Each
    pair names its clip (``shard_idx`` into ``urls``, ``sample_idx``); with a ``ledger``
    (:class:`EpochLedger`) the clips it lists are left out of the pass. Fails fast, naming
    the path, when no shard is found.
    """
    check_transport(data)
    urls = urls if urls is not None else list_shards(data)
    if not urls:
        raise FileNotFoundError(f"no *.tar shards found at {data.shards!r}")
    versions = _manifest_versions(data) if data.cache_dir else {}
    rows = [{"shard": u, "shard_index": i} for i, u in enumerate(urls)]
    if data.cache_dir:  # same columns in every row
        rows = [{**r, **versions.get(os.path.basename(r["shard"]), {"sha256": "", "bytes": 0})} for r in rows]
    ds = ray.data.from_items(rows, override_num_blocks=len(urls))
    if data.shuffle_shards:
        # One shard per block: a fresh block order each epoch is a fresh shard order,
        # without random_shuffle's all-to-all tasks before the first decode.
        ds = ds.randomize_block_order()
    remote_args: dict[str, Any] = {"num_cpus": data.decode_num_cpus}
    if data.decode_resources:
        remote_args["resources"] = dict(data.decode_resources)
    if data.decode_concurrency:
        remote_args["compute"] = ray.data.TaskPoolStrategy(size=data.decode_concurrency)
    # batch_size=1: one shard per call, so a task's blocks come from one shard and its
    # counts are reported when that shard is done.
    ds = ds.map_batches(
        decode_and_crop_blocks,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"cfg": _plain(data), "counter": counter, "ledger": ledger},
        **remote_args,
    )
    # Each yield of decode_and_crop_blocks becomes one block as it is: Ray Data would
    # otherwise concatenate yields up to its 128 MiB target (a copy of every pair) or
    # slice them. Ray Data pays ~8 ms per block on top of ~0.02 ms per pair (measured),
    # hence blocks of hundreds of pairs. This context is this dataset's own copy.
    block_bytes = data.block_pairs * (2 * data.segment_samples * (2 if data.transport == "int16" else 4) + 32)
    ds.context.target_max_block_size = max(1, int(0.75 * block_bytes))
    return ds


def check_transport(data: DataConfig) -> None:
    """Raise ValueError for a ``data.transport`` that cannot carry the configured pairs."""
    if data.transport not in ("int16", "float32"):
        raise ValueError(f"data.transport must be 'int16' or 'float32', got {data.transport!r}")
    if data.transport == "int16" and data.positive_noise_std > 0:
        raise ValueError(
            f"data.positive_noise_std={data.positive_noise_std} adds float noise in the decode task, "
            "which int16 pairs cannot carry; set data.transport=float32")


def _plain(data: DataConfig) -> dict[str, Any]:
    return dataclasses.asdict(data)


def _manifest_versions(data: DataConfig) -> dict[str, dict[str, Any]]:
    """Shard file name -> ``{"sha256", "bytes"}`` from the manifest at ``data.shards`` ({} if none):
    the cache keys entries by them, so a rebuilt shard is never served from a stale entry."""
    try:
        manifest = shards.read_manifest(data.shards, data.s3_endpoint_url, data.s3_region)
    except (FileNotFoundError, ValueError):
        return {}
    return {os.path.basename(s["name"]): {"sha256": s["sha256"], "bytes": s["bytes"]} for s in manifest["shards"]}
