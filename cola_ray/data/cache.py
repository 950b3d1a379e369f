"""Node-local cache of decoded shards: int16 PCM on each node's local disk, reused every epoch.

The first read of a shard on a node decodes it fully (as the streaming path does) and
writes its clips as one int16 PCM file + one JSON index; later reads on that node
memory-map the PCM and touch only the crops' pages, so an epoch costs no decoding::

    cache = ShardCache("/mnt/local/cola-cache", max_bytes=200 << 30)
    name = cache.entry_name(url, version)          # version: manifest sha256 + size, or size + mtime
    shard = cache.open(name)                        # CachedShard or None (miss)
    if shard is None:
        with cache.writer(name) as w:               # on a miss: decode, add, commit
            for key, wave in clips:
                clip = w.add(key, wave)             # int16 -> float32 again: what a hit returns
    for i in range(len(shard)): shard.crop_pairs(i, 15600, rng, ...)

Layout under ``root``: ``<name>.json`` (the index: keys, offsets, lengths, scales, norms,
the pcm file's name and size, the shard's bad-sample counts), ``<name>-<uid>.pcm`` (all
clips' int16 samples, back to back) and an empty ``<name>.lock``. Several workers on one
node may fill the same entry at once: each streams into its own uniquely named temp
files; commits are serialised by an flock on the entry's lock file, and the commit point
is one atomic ``os.replace`` of the index; a later commit replaces an earlier one's PCM
(identical content) and removes it. Readers take no lock: a reader that mapped a removed
file keeps its mapping (POSIX), one that finds it gone treats the entry as a miss. A disk
error while writing costs the cache entry (logged), never the run.

Quantisation: ``int16 = round(wave * q)`` with ``q = 32768`` (``32767 / peak`` for a clip
louder than 1.0), decoded as ``int16 * (1 / q)``. For 16-bit sources (the FLAC
``shards build`` writes, 16-bit WAV) this is lossless: the cache returns exactly the float
samples of a full decode. For Vorbis / Opus / float sources it rounds by at most
``0.5 / q`` (1/65536 of full scale). The pipeline crops a cache miss from the quantised
clip too, so a miss and a hit give identical pairs for the same generator state.

Bounded: after each commit, least-recently-used entries (index mtime, refreshed on every
hit) are removed until the folder holds at most ``max_bytes``; an entry larger than the
bound on its own is not kept. Pure numpy + os: no Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cola_ray.data import audio

log = logging.getLogger(__name__)

FORMAT = "cola-ray-pcm-cache/1"
NAME_LEN = 32
"""Entry names are 32 hex characters; every file of an entry is ``<name>.*`` or ``<name>-*``."""
ORPHAN_AGE_S = 600.0
"""Temporary / unreferenced files older than this are treated as left by a dead writer."""


def quantise(wave: np.ndarray) -> tuple[np.ndarray, float]:
    """(T,) float32 -> ((T,) int16, q): ``round(wave * q)``, q = 32768 or 32767 / peak if louder."""
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    q = 32768.0 if peak <= 1.0 else 32767.0 / peak
    return np.clip(np.rint(wave.astype(np.float64) * q), -32768, 32767).astype(np.int16), q


def dequantise(pcm: np.ndarray, q: float) -> np.ndarray:
    """(T,) int16 -> (T,) float32 ``pcm * (1 / q)`` (exact for q = 32768)."""
    return pcm.astype(np.float32) * np.float32(1.0 / q)


@dataclass
class CachedShard:
    """The clips of one cached shard: int16 PCM (memory-mapped on a hit) + per-clip index."""

    keys: list[str]
    offsets: list[int]
    lengths: list[int]
    scales: list[float]
    inv_norms: list[float]
    pcm: np.ndarray  # (total,) int16, a read-only view of the memory-mapped file on a hit
    bad: dict[str, int]

    def __len__(self) -> int:
        return len(self.keys)

    def clip(self, i: int) -> np.ndarray:
        """Clip i as (T,) float32 (reads the whole clip)."""
        o = self.offsets[i]
        return dequantise(self.pcm[o : o + self.lengths[i]], self.scales[i])

    def crop_pairs(
        self, i: int, n: int, rng: np.random.Generator, *, k: int = 1, l2_normalize: bool = True,
        noise_std: float = 0.0, short: str = "pad",
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``k`` pairs of clip i, equal to ``audio.crop_pair(self.clip(i), n, rng, ...)`` k times,
        touching only the crops' samples (the clip's norm is stored in the index)."""
        length = self.lengths[i]
        if length < n:  # short clips: the padding rule lives in crop_pair
            clip = self.clip(i)
            return [audio.crop_pair(clip, n, rng, l2_normalize=l2_normalize, noise_std=noise_std, short=short,
                                    name=self.keys[i]) for _ in range(k)]
        o, q = self.offsets[i], self.scales[i]
        scale = np.float32(self.inv_norms[i]) if l2_normalize else np.float32(1.0)
        out = []
        for _ in range(k):
            a0, p0 = audio.crop_offsets(length, n, rng)
            anchor = dequantise(self.pcm[o + a0 : o + a0 + n], q) * scale
            positive = dequantise(self.pcm[o + p0 : o + p0 + n], q) * scale
            out.append((anchor, audio.add_positive_noise(positive, noise_std, rng)))
        return out

    def pcm_pairs(self, i: int, n: int, rng: np.random.Generator, *, k: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
        """The crops of :meth:`crop_pairs` (same draws, no noise) as the cached int16 samples,
        for the int16 transport: ``dequantise(pcm, q) * gain`` is what ``crop_pairs`` returns.
        Clip i must be at least ``n`` long. The crops are read-only views into the memory map
        (they keep it open): the block that stacks them makes the one copy, where a copy here
        too cost a quarter of the warm cache's CPU (``benchmarks/raydata_bench.py``)."""
        o = self.offsets[i]
        out = []
        for _ in range(k):
            a0, p0 = audio.crop_offsets(self.lengths[i], n, rng)
            out.append((self.pcm[o + a0 : o + a0 + n], self.pcm[o + p0 : o + p0 + n]))
        return out


class ShardCache:
    """A bounded folder of :class:`CachedShard` entries on this node's local disk."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def entry_name(url: str, version: str) -> str:
        """Entry name for one shard: sha256 of its URL and ``version`` (manifest sha256 + size,
        or size + mtime), so a changed shard gets a new entry and is never served stale."""
        return hashlib.sha256(f"{FORMAT}\n{url}\n{version}".encode()).hexdigest()[:NAME_LEN]

    def open(self, name: str) -> CachedShard | None:
        """The entry, memory-mapped, or None on a miss (absent, half-written or evicted)."""
        index_path = self.root / f"{name}.json"
        try:
            index = json.loads(index_path.read_text())
            pcm_path = self.root / index["pcm"]
            if index.get("format") != FORMAT or pcm_path.stat().st_size != 2 * index["samples"]:
                return None
            # A plain ndarray view of the map (it keeps the file mapped): slices of a np.memmap
            # pay memmap's bookkeeping on every crop of a warm epoch.
            pcm = (np.memmap(pcm_path, dtype=np.int16, mode="r").view(np.ndarray) if index["samples"]
                   else np.zeros(0, dtype=np.int16))
            os.utime(index_path)  # recency for LRU eviction
        except (OSError, ValueError, KeyError):
            return None
        clips = index["clips"]
        return CachedShard(
            keys=[c[0] for c in clips], offsets=[c[1] for c in clips], lengths=[c[2] for c in clips],
            scales=[c[3] for c in clips], inv_norms=[c[4] for c in clips], pcm=pcm, bad=dict(index["bad"]),
        )

    def writer(self, name: str) -> "EntryWriter":
        return EntryWriter(self, name)

    def total_bytes(self) -> int:
        return sum(_size(p) for p in self.root.iterdir())

    def evict(self, keep: str = "") -> None:
        """Remove least-recently-used entries (and files of dead writers) until at most max_bytes.

        Reads no index: files are grouped by entry name (the part before "-" or "."), recency
        is the index's mtime. An entry being committed elsewhere (its lock held) is skipped.
        """
        now = time.time()
        groups: dict[str, list[Path]] = {}
        for p in self.root.iterdir():
            groups.setdefault(re.split(r"[-.]", p.name, maxsplit=1)[0], []).append(p)
        entries: list[tuple[float, str, list[Path]]] = []
        for name, files in groups.items():
            index = self.root / f"{name}.json"
            data = [f for f in files if not f.name.endswith(".lock")]
            if index in files:
                try:
                    entries.append((index.stat().st_mtime, name, data))
                except OSError:
                    pass
                continue
            for f in data:  # no index: a crashed writer's files, once old enough
                try:
                    if now - f.stat().st_mtime > ORPHAN_AGE_S:
                        f.unlink()
                except OSError:
                    pass
        for _, name, files in entries:  # a crashed writer's temp files beside a live entry
            for f in files:
                try:
                    if f.name.endswith(".tmp") and now - f.stat().st_mtime > ORPHAN_AGE_S:
                        f.unlink()
                except OSError:
                    pass
        total = self.total_bytes()
        # Oldest first; the entry just written last (it goes only if it alone is over the bound).
        for _, name, files in sorted(entries, key=lambda e: (e[1] == keep, e[0])):
            if total <= self.max_bytes:
                break
            with _entry_lock(self.root, name, blocking=False) as locked:
                if not locked:
                    continue
                for f in sorted(files, key=lambda f: not f.name.endswith(".json")):  # index first
                    total -= _size(f)
                    _unlink(f)


class EntryWriter:
    """Writes one entry: clips streamed to a temp PCM file, committed by renaming the index."""

    def __init__(self, cache: ShardCache, name: str):
        self.cache, self.name = cache, name
        self.uid = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pcm_name = f"{name}-{self.uid}.pcm"
        self.tmp_pcm = cache.root / f"{self.pcm_name}.tmp"
        self.clips: list[list[Any]] = []
        self.samples = 0
        self.failed = False
        self._f = None

    def __enter__(self) -> "EntryWriter":
        self._f = open(self.tmp_pcm, "wb")
        return self

    def add(self, key: str, wave: np.ndarray) -> np.ndarray:
        """Append one clip; return it as a cache hit will return it: (T,) float32 through int16."""
        pcm, q = quantise(wave)
        if not self.failed:
            try:
                self._f.write(pcm.tobytes())  # type: ignore[union-attr]
            except OSError as e:  # disk full: stream on without caching this shard
                log.warning("could not cache %s in %s: %s", self.name, self.cache.root, e)
                self.failed = True
        clip = dequantise(pcm, q)
        self.clips.append([key, self.samples, int(pcm.shape[0]), q, float(audio._inv_norm(clip))])
        self.samples += int(pcm.shape[0])
        return clip

    def commit(self, bad: dict[str, int]) -> None:
        """Publish the entry (atomic rename of the index, written last), then evict to the bound."""
        assert self._f is not None
        try:
            self._f.close()
        except OSError as e:
            log.warning("could not cache %s in %s: %s", self.name, self.cache.root, e)
            self.failed = True
        self._f = None
        if self.failed:
            _unlink(self.tmp_pcm)
            return
        root = self.cache.root
        index = {"format": FORMAT, "pcm": self.pcm_name, "samples": self.samples, "clips": self.clips,
                 "bad": dict(bad)}
        index_path = root / f"{self.name}.json"
        tmp_index = root / f"{self.name}-{self.uid}.json.tmp"
        try:
            tmp_index.write_text(json.dumps(index))
            # Serialised per entry (flock on this node's disk): two workers that decoded the same
            # shard commit one after the other; the later one's copy replaces the earlier one's.
            with _entry_lock(root, self.name, blocking=True):
                try:
                    previous = json.loads(index_path.read_text()).get("pcm")
                except (OSError, ValueError):
                    previous = None
                os.replace(self.tmp_pcm, root / self.pcm_name)
                os.replace(tmp_index, index_path)  # the commit point
                if previous and previous != self.pcm_name:
                    _unlink(root / previous)  # readers that mapped it keep their mapping
        except OSError as e:  # a full or failing local disk costs the cache, never the run
            log.warning("could not cache %s in %s: %s", self.name, root, e)
            _unlink(tmp_index)
            _unlink(self.tmp_pcm)
            return
        self.cache.evict(keep=self.name)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        _unlink(self.tmp_pcm)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._f is not None:  # not committed (an error, or the caller chose not to)
            self.abort()


@contextlib.contextmanager
def _entry_lock(root: Path, name: str, *, blocking: bool) -> Iterator[bool]:
    """Exclusive flock on ``<name>.lock``; yields False if non-blocking and held elsewhere."""
    fd = os.open(root / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
