"""WebDataset tar shards of audio clips: build, read (streaming), verify.

Layout of a shard folder (local or ``s3://bucket/prefix``)::

    shard-000000.tar    <key>.flac  16 kHz mono FLAC (PCM_16)
                        <key>.json  {"key", "source", "duration", "orig_sample_rate",
                                     "orig_channels", ["label"], ["split"], ["gain"]}
    shard-000001.tar    ...
    manifest.json       {"format": "cola-ray-shards/1", "sample_rate": 16000,
                         "shards": [{"name", "bytes", "sha256", "samples", "sources"}, ...],
                         "complete": bool, "build": {...}, "skipped": [...]}

The manifest is what makes a shard trustworthy: a streaming tar reader cannot tell a
truncated archive from a short one in general, the manifest's size and sha256 can.
Every training read checks the shard against it (:func:`manifest_entry` ->
``iter_samples(..., expected=entry)``: size up front, bytes / samples / sha256 at the end,
the last sample held back until they match). :func:`iter_samples` adds its own
end-of-archive check so that reading shards without a manifest (made elsewhere) still
never yields a sample cut short.

Reading never extracts to disk and never unpickles: members are raw bytes, and only an
allowlist of suffixes (audio + json) is kept::

    for url in shard_urls("s3://bucket/shards"):
        with open_input(url) as stream:
            for item in iter_samples(stream, url):
                if isinstance(item, BadSample):         # hostile member name
                    skipped[item.reason] += 1
                    continue
                key, members = item
                suffix, data = audio_member(members, key)
"""

from __future__ import annotations

import bz2
import collections
import csv
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np

from cola_ray.data import storage
from cola_ray.data.audio import AUDIO_SUFFIXES, BadSample, audio_member, decode_audio

FORMAT = "cola-ray-shards/1"
MANIFEST = "manifest.json"
SAMPLE_SUFFIXES = AUDIO_SUFFIXES + ("json",)
SOURCE_EXTENSIONS = frozenset(
    {"wav", "wave", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "aifc", "au", "snd", "caf", "w64", "rf64"}
)
"""File extensions :func:`build_shards` tries to decode (what libsndfile reads)."""

PICKLE_SUFFIXES = frozenset({"pkl", "pickle", "pyd", "pt", "pth", "ckpt", "joblib"})
"""Member suffixes that are pickles by convention (webdataset unpickles ``pyd``/``pkl`` and
``torch.load``s ``pt``/``pth``): never read, counted as ``pickle_member`` when skipped."""

MAX_MEMBER_BYTES = 512 << 20
_TAR_MTIME = 1577836800  # 2020-01-01: fixed so that a rebuild is byte-identical
_BLOCK = tarfile.BLOCKSIZE


class ShardError(Exception):
    """A shard that cannot be read as a whole (truncated, corrupt, keys not grouped).

    ``shard`` is its URL or name, ``detail`` what is wrong. Samples yielded before the
    error were complete; the rest of the shard is lost and the shard should be quarantined.
    """

    def __init__(self, shard: str, detail: str):
        self.shard = str(shard)
        self.detail = detail
        super().__init__(f"shard {self.shard}: {detail}")

    def __reduce__(self):
        return (type(self), (self.shard, self.detail))


@dataclass(frozen=True)
class ShardProblem:
    """One finding of :func:`verify_shards`: which shard, and what is wrong with it."""

    shard: str
    problem: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.problem}"


# ---- member names and keys -------------------------------------------------------------

def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.flac"`` -> ``("dir/abc", "seg.flac")``, as webdataset splits names.

    The key runs to the first dot of the basename. Names without a dot in the basename,
    or starting with one (``.hidden``, ``._mac``), have no key: None.
    """
    head, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), suffix


def key_problem(key: str) -> str | None:
    """Why a member key is not safe to use as an identifier (None if it is fine).

    Keys are never used as paths here, but downstream code (exports, caches) may, so
    absolute paths, ``..`` components, backslashes and control characters are refused.
    """
    if not key:
        return "empty key"
    if key.startswith(("/", "\\")) or (len(key) > 1 and key[1] == ":"):
        return "absolute path"
    if ".." in key.replace("\\", "/").split("/"):
        return "'..' component"
    if "\\" in key:
        return "backslash in key"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "control character in key"
    return None


# ---- reading ---------------------------------------------------------------------------

def iter_samples(
    stream: IO[bytes],
    shard_name: str,
    *,
    suffixes: tuple[str, ...] = SAMPLE_SUFFIXES,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    expected: Mapping[str, Any] | None = None,
    ignored: collections.Counter | None = None,
) -> Iterator[tuple[str, dict[str, bytes]] | BadSample]:
    """Stream ``(key, members)`` from one tar shard, members grouped by key in order.

    ``members`` maps a lower-case suffix (``"flac"``, ``"json"``) to raw bytes; only
    ``suffixes`` are kept, other members are skipped unread. A sample whose key is hostile
    (absolute path, ``..``, control characters) is not a tuple: it is yielded once as a
    ``BadSample("bad_key")`` *instance* (not raised, so reading goes on), its data unread
    and its key only quoted in the message; the caller counts it like any other bad sample
    (``isinstance(item, BadSample)``). A sample with no allowlisted member is yielded with
    ``members == {}`` (``audio.audio_member`` then raises ``no_audio_member``).

    Raises :class:`ShardError` naming the shard for: an unreadable or truncated archive
    (also one cut exactly between members, which ``tarfile`` alone takes for the end),
    a corrupt header, a key that reappears after other keys, a duplicate member, or a
    member over ``max_member_bytes``. A sample is yielded only once the next header (or
    the end-of-archive marker) has been read, so no sample yielded is cut short.
    Directories, links and devices are ignored; nothing is written to disk; nothing is
    unpickled. Plain, gzip, bz2 and xz tars are read.

    ``expected`` is the shard's manifest entry (``bytes``, ``sha256``, ``samples``; see
    :func:`manifest_entry`). With it the shard is checked against the manifest: its size
    before anything is read when the stream knows it (a local file, an S3 object), then,
    streaming, the bytes read, their sha256 and the number of samples once the archive
    ends; a mismatch raises :class:`ShardError` before the last sample is yielded. So a
    truncated shard yields nothing when its size is known up front and only samples
    read whole otherwise; an altered shard of the right size (bytes flipped, a tail
    zero-filled) is refused at its end, after the samples before the alteration.

    ``ignored`` (a Counter), if given, counts the members skipped unread by kind:
    ``pickle_member`` for pickle-format suffixes (:data:`PICKLE_SUFFIXES`), else
    ``other_member``.
    """
    allowed = {s.lower() for s in suffixes}
    hashing: _Hashing | None = None
    if expected is not None:
        size = storage.stream_size(stream)
        if size is not None and size != expected["bytes"]:
            raise ShardError(shard_name, f"{size} bytes, the manifest says {expected['bytes']} (truncated or replaced)")
        stream = hashing = _Hashing(stream)
    try:
        source = _TarSource(stream)
        tar = tarfile.open(fileobj=source, mode="r|")
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as e:
        raise ShardError(shard_name, f"unreadable tar: {e}") from None
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    bad: str | None = None
    n_done = 0

    def finished() -> tuple[str, dict[str, bytes]] | BadSample:
        assert key is not None
        if bad is not None:
            return BadSample("bad_key", f"{shard_name}:{key!r}", bad)
        return key, members

    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as e:
            raise ShardError(shard_name, f"truncated or corrupt after {n_done} samples: {e}") from None
        if info is None:
            break
        tar.members = []  # a streaming reader need not remember every header
        if not info.isfile():
            continue  # directories, (sym)links, devices: never followed
        parsed = split_member_name(info.name)
        if parsed is None:
            continue
        member_key, suffix = parsed
        if member_key != key:
            if key is not None:
                yield finished()
                n_done += 1
            if member_key in seen:
                raise ShardError(
                    shard_name, f"key {member_key!r} reappears after other keys (members not grouped)"
                )
            seen.add(member_key)
            key, members, bad = member_key, {}, key_problem(member_key)
        suffix = suffix.lower()
        if bad is not None:
            continue
        if suffix not in allowed:
            if ignored is not None:
                ignored["pickle_member" if suffix.rpartition(".")[2] in PICKLE_SUFFIXES else "other_member"] += 1
            continue
        if suffix in members:
            raise ShardError(shard_name, f"duplicate member {suffix!r} for key {key!r}")
        if info.size > max_member_bytes:
            raise ShardError(shard_name, f"member {info.name!r} is {info.size} bytes (> {max_member_bytes})")
        try:
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as e:
            raise ShardError(shard_name, f"truncated inside member {info.name!r}: {e}") from None
        if len(data) != info.size:
            raise ShardError(shard_name, f"truncated inside member {info.name!r}")
        members[suffix] = data
    # tarfile stops quietly at a missing or garbled header; only a zero block there is a
    # real end of archive. Check it before handing out the last sample.
    end = tar.offset
    marker = source.bytes_at(end, _BLOCK)
    if len(marker) < _BLOCK:
        raise ShardError(shard_name, f"truncated at byte {end} after {n_done} samples (no end-of-archive marker)")
    if marker.count(0) != _BLOCK:
        raise ShardError(shard_name, f"corrupt member header at byte {end} after {n_done} samples")
    if hashing is not None:
        assert expected is not None
        _check_against_manifest(shard_name, hashing, n_done + (key is not None), expected)
    if key is not None:
        yield finished()


def _check_against_manifest(shard_name: str, hashing: _Hashing, samples: int, expected: Mapping[str, Any]) -> None:
    """Raise :class:`ShardError` if a shard read to its end-of-archive marker differs from its
    manifest entry: bytes (the padding after the marker is read too), samples, sha256."""
    try:
        hashing.drain()
    except (OSError, EOFError) as e:
        raise ShardError(shard_name, f"unreadable after the end-of-archive marker: {e}") from None
    if hashing.bytes != expected["bytes"]:
        raise ShardError(shard_name, f"{hashing.bytes} bytes read, the manifest says {expected['bytes']} (truncated)")
    if samples != expected["samples"]:
        raise ShardError(shard_name, f"{samples} samples, the manifest says {expected['samples']}")
    digest = hashing.sha256.hexdigest()
    if digest != expected["sha256"]:
        raise ShardError(shard_name, f"sha256 {digest} differs from the manifest's {expected['sha256']} (altered)")


def sample_meta(members: Mapping[str, bytes], sample: str = "<sample>") -> dict[str, Any]:
    """The sample's ``json`` member as a dict ({} if it has none).

    Raises :class:`BadSample` ``bad_json`` if it is not UTF-8 JSON holding an object.
    """
    raw = members.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample("bad_json", sample, str(e)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", sample, f"expected an object, got {type(meta).__name__}")
    return meta


class _TarSource(io.RawIOBase):
    """The (decompressed) tar byte stream, counting offsets and keeping the recent tail.

    tarfile reads ahead in 10 KiB records; keeping the last 64 KiB lets
    :func:`iter_samples` look at the block where tarfile stopped.
    """

    _KEEP = 64 << 10

    def __init__(self, stream: IO[bytes]):
        head = _read_exact(stream, 6)
        chained = _Prefixed(head, stream)
        if head.startswith(b"\x1f\x8b"):
            self._inner: IO[bytes] = gzip.GzipFile(fileobj=chained, mode="rb")
        elif head.startswith(b"BZh"):
            self._inner = bz2.BZ2File(chained, mode="rb")
        elif head.startswith(b"\xfd7zXZ\x00"):
            self._inner = lzma.LZMAFile(chained, mode="rb")
        else:
            self._inner = chained
        self._pos = 0
        self._tail: collections.deque[tuple[int, bytes]] = collections.deque()
        self._tail_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size) if size is not None and size >= 0 else self._inner.read()
        if data:
            self._tail.append((self._pos, data))
            self._tail_bytes += len(data)
            self._pos += len(data)
            while len(self._tail) > 1 and self._tail_bytes - len(self._tail[0][1]) >= self._KEEP:
                self._tail_bytes -= len(self._tail.popleft()[1])
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def bytes_at(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset + n) of the stream (fewer at its end), reading on if needed."""
        while self._pos < offset + n:
            if not self.read(max(n, 1 << 16)):
                break
        out = bytearray()
        for start, chunk in self._tail:
            lo, hi = max(offset, start), min(offset + n, start + len(chunk))
            if lo < hi:
                out += chunk[lo - start : hi - start]
        if self._tail and self._tail[0][0] > offset:
            raise RuntimeError("tar tail no longer buffered")  # tarfile read ahead > 64 KiB
        return bytes(out)


class _Prefixed(io.RawIOBase):
    """``head`` followed by the rest of ``stream``."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                out, self._head = self._head + self._stream.read(), b""
                return out
            out, self._head = self._head[:size], self._head[size:]
            return out
        return self._stream.read() if size is None or size < 0 else self._stream.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class _Hashing(io.RawIOBase):
    """Passes reads through and hashes every byte (sha256) and counts them."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read() if size is None or size < 0 else self._stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


# ---- listing ---------------------------------------------------------------------------

def read_manifest(url: str, endpoint_url: str = "", region: str = "") -> dict[str, Any]:
    """The manifest of the shard folder ``url`` (or of ``.../manifest.json``).

    Raises ``FileNotFoundError`` naming the path if there is none (also for a glob or a
    single ``.tar``), ``ValueError`` naming it if it is not a cola-ray shard manifest.
    """
    url = str(url)
    if url.endswith(".tar") or any(c in url for c in "*?["):
        raise FileNotFoundError(f"{url} is a shard or a glob, not a folder with a {MANIFEST}")
    path = url if url.endswith(".json") else storage.join(url, MANIFEST)
    if not storage.exists(path, endpoint_url, region):
        raise FileNotFoundError(f"no shard manifest at {path}")
    try:
        manifest = json.loads(storage.read_bytes(path, endpoint_url, region).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and {"name", "bytes", "sha256", "samples"} <= s.keys() for s in shards
    ):
        raise ValueError(f"{path}: 'shards' must be a list of {{name, bytes, sha256, samples}}")
    return manifest


def manifest_entry(shard_url: str, endpoint_url: str = "", region: str = "") -> dict[str, Any] | None:
    """The manifest entry (``name``, ``bytes``, ``sha256``, ``samples``) of the shard at
    ``shard_url``, from the ``manifest.json`` in the same folder; None if that folder has
    no manifest or it does not list the shard (shards made elsewhere are read unchecked).

    Manifests are parsed once per process and folder, and again when the manifest file
    changes (one stat / HEAD per call). An invalid manifest raises :class:`ShardError`.
    """
    shard_url = str(shard_url)
    if storage.is_s3(shard_url):
        folder, _, name = shard_url.rpartition("/")
    else:
        path = os.path.abspath(shard_url[len("file://"):] if shard_url.startswith("file://") else shard_url)
        folder, name = os.path.dirname(path), os.path.basename(path)
    stamp = storage.file_stamp(storage.join(folder, MANIFEST), endpoint_url, region)
    if stamp is None:
        return None
    try:
        entries = _manifest_entries(folder, endpoint_url, region, stamp)
    except (ValueError, FileNotFoundError) as e:
        raise ShardError(name, f"its manifest cannot be used: {e}") from None
    return entries.get(name)


@functools.lru_cache(maxsize=16)
def _manifest_entries(folder: str, endpoint_url: str, region: str, stamp: str) -> dict[str, dict[str, Any]]:
    del stamp  # part of the cache key only: a rewritten manifest is read again
    return {s["name"]: s for s in read_manifest(folder, endpoint_url, region)["shards"]}


def shard_urls(url: str, endpoint_url: str = "", region: str = "") -> list[str]:
    """Full URLs of the shards at ``url``, in order.

    A folder / prefix with a manifest: the manifest's shards. Otherwise (shards made
    elsewhere, a glob, a single tar) every ``*.tar`` found there, sorted. Nothing there ->
    ``FileNotFoundError`` naming ``url``.
    """
    try:
        manifest = read_manifest(url, endpoint_url, region)
    except FileNotFoundError:
        return storage.list_files(url, ".tar", endpoint_url, region)
    if not manifest["shards"]:
        raise FileNotFoundError(f"the manifest at {url} lists no shards")
    return [_shard_url(url, s["name"]) for s in manifest["shards"]]


def _shard_url(folder: str, name: str) -> str:
    joined = storage.join(folder, name)
    return joined if storage.is_s3(joined) else os.path.abspath(joined)


# ---- verifying -------------------------------------------------------------------------

def verify_shards(
    url: str, endpoint_url: str = "", region: str = "", *, max_per_shard: int = 10
) -> list[ShardProblem]:
    """Read every shard at ``url`` in full and report what is wrong; [] means all good.

    With a manifest: missing shards, size / sha256 / sample-count mismatches and shards
    present but not listed. Always: unreadable or truncated tars, keys not grouped,
    hostile member names, samples without an audio member (and, with a manifest, without
    a valid json member). Each shard is streamed once and hashed while it is read; at most
    ``max_per_shard`` sample-level problems are listed per shard.
    """
    problems: list[ShardProblem] = []
    manifest: dict[str, Any] | None
    try:
        manifest = read_manifest(url, endpoint_url, region)
    except FileNotFoundError:
        manifest = None
    except ValueError as e:
        problems.append(ShardProblem(storage.join(url, MANIFEST), str(e)))
        manifest = None
    try:
        sizes = storage.list_sizes(url, ".tar", endpoint_url, region)
    except FileNotFoundError:
        sizes = {}
    if manifest is None:
        if not sizes:
            problems.append(ShardProblem(str(url), "no manifest and no *.tar shards"))
        for shard in sizes:
            problems += _check_shard(shard, None, endpoint_url, region, max_per_shard)
        return problems
    listed = set()
    for entry in manifest["shards"]:
        shard = _shard_url(url, entry["name"])
        listed.add(shard)
        size = sizes.get(shard)
        if size is None:
            problems.append(ShardProblem(shard, "missing (listed in the manifest)"))
        elif size != entry["bytes"]:
            problems.append(ShardProblem(shard, f"size is {size} bytes, the manifest says {entry['bytes']}"))
        else:
            problems += _check_shard(shard, entry, endpoint_url, region, max_per_shard)
    for shard in sizes:
        if shard not in listed:
            problems.append(ShardProblem(shard, "present but not listed in the manifest"))
    return problems


def _check_shard(
    shard: str, entry: Mapping[str, Any] | None, endpoint_url: str, region: str, max_per_shard: int
) -> list[ShardProblem]:
    found: list[str] = []
    n = 0
    try:
        with storage.open_input(shard, endpoint_url, region) as raw:
            stream = _Hashing(raw)
            for item in iter_samples(stream, shard):
                n += 1
                if isinstance(item, BadSample):
                    found.append(f"hostile member name: {item}")
                    continue
                key, members = item
                try:
                    audio_member(members, key)
                    if entry is not None:
                        if "json" not in members:
                            found.append(f"sample {key!r} has no json member")
                        else:
                            sample_meta(members, key)
                except BadSample as e:
                    found.append(f"sample {key!r}: {e.reason} ({e.detail})")
            stream.drain()
    except ShardError as e:
        return [ShardProblem(shard, e.detail)]
    except OSError as e:
        return [ShardProblem(shard, f"cannot read: {e}")]
    if entry is not None:
        if stream.sha256.hexdigest() != entry["sha256"]:
            found.append(f"sha256 {stream.sha256.hexdigest()} differs from the manifest's {entry['sha256']}")
        if n != entry["samples"]:
            found.append(f"{n} samples, the manifest says {entry['samples']}")
    out = [ShardProblem(shard, p) for p in found[:max_per_shard]]
    if len(found) > max_per_shard:
        out.append(ShardProblem(shard, f"... and {len(found) - max_per_shard} more problems"))
    return out


# ---- building --------------------------------------------------------------------------

def find_audio_files(src: str | Path) -> list[str]:
    """Relative POSIX paths of the audio files under ``src`` (recursive, sorted).

    Audio means an extension in :data:`SOURCE_EXTENSIONS`; hidden files and folders are
    left out (``._x.wav`` from macOS is not audio).
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder not found: {root}")
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name.rpartition(".")[2].lower() not in SOURCE_EXTENSIONS:
                continue
            out.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(out)


def make_keys(paths: list[str]) -> list[str]:
    """One unique key per relative path: ``"dogs/bark.01.wav"`` -> ``"dogs__bark_01"``.

    Keys hold only ``[A-Za-z0-9_-]``: webdataset splits a member name at the first dot of
    its basename, and a slash would make a folder. Clashes (``a.wav`` and ``a.flac``) get
    ``_2``, ``_3``, ... in sorted order, so the same paths always give the same keys.
    """
    used: set[str] = set()
    keys = []
    for rel in paths:
        stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
        base = "__".join(
            "".join(c if (c.isascii() and (c.isalnum() or c in "-_")) else "_" for c in part)
            for part in stem.split("/")
        ) or "clip"
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def read_labels(labels_csv: str | Path, src: str | Path) -> dict[str, dict[str, str]]:
    """``{relative_path: {"label": ..., ["split": ...]}}`` from rows ``path,label[,split]``.

    Paths may be relative to ``src`` or absolute (inside ``src``); a first row whose path
    column is ``path`` / ``file`` / ``filename`` is a header. Raises ``ValueError`` naming
    the file and line for a row with fewer than two columns.
    """
    text = storage.read_bytes(str(labels_csv)).decode("utf-8-sig")
    root = Path(src).resolve()
    out: dict[str, dict[str, str]] = {}
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip():
            continue
        if line_no == 1 and row[0].strip().lower() in ("path", "file", "filename"):
            continue
        if len(row) < 2:
            raise ValueError(f"{labels_csv}:{line_no}: expected 'path,label[,split]', got {row!r}")
        path = row[0].strip()
        if os.path.isabs(path):
            try:
                rel = Path(path).resolve().relative_to(root).as_posix()
            except ValueError:
                continue  # a file outside SRC cannot be in the shards
        else:
            rel = posixpath.normpath(path.replace("\\", "/"))
        entry = {"label": row[1].strip()}
        if len(row) > 2 and row[2].strip():
            entry["split"] = row[2].strip()
        out[rel] = entry
    return out


def build_shards(
    src: str | Path,
    out: str | Path,
    *,
    labels_csv: str | Path | None = None,
    max_samples: int = 1000,
    max_bytes: int = 0,
    sample_rate: int = 16000,
    progress: bool = True,
    endpoint_url: str = "",
    region: str = "",
) -> dict[str, Any]:
    """Pack the audio files under ``src`` into FLAC WebDataset shards at ``out``.

    Files are taken in sorted order, decoded, down-mixed and resampled to
    ``sample_rate`` and stored as ``<key>.flac`` + ``<key>.json``. A shard closes at
    ``max_samples`` samples, or before a sample would take it past ``max_bytes`` (0: no
    limit; tar padding may add up to 10 KiB). ``out`` is a folder or ``s3://bucket/prefix``.

    The manifest is rewritten after every finished shard, so a re-run resumes: shards it
    lists whose file at ``out`` has the listed size are kept untouched, and building goes
    on from the first source file after them. Same inputs -> byte-identical shards.
    Unreadable files are skipped and listed in the manifest's ``skipped``; never fatal.
    Returns the manifest.
    """
    from tqdm import tqdm

    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    src, out = Path(src), str(out)
    files = find_audio_files(src)
    if not files:
        raise FileNotFoundError(f"no audio files under {src}")
    labels = read_labels(labels_csv, src) if labels_csv is not None else {}
    keys = make_keys(files)
    build = {
        "sources": len(files),
        "sources_sha256": _listing_hash(files, labels),
        "max_samples": max_samples,
        "max_bytes": max_bytes,
    }
    shards, skipped, start = _resume_point(out, build, sample_rate, files, endpoint_url, region)
    if start == len(files) and shards:
        manifest = _manifest(sample_rate, build, shards, skipped, complete=True)
        if progress:
            print(f"{out}: all {len(shards)} shards already built", file=sys.stderr)
        return manifest

    with tempfile.TemporaryDirectory(prefix="cola-shards-") as tmp:
        writer: _ShardWriter | None = None

        def finish(stop: int) -> None:
            entry = writer.close(stop)  # type: ignore[union-attr]
            shards.append(entry)
            manifest = _manifest(sample_rate, build, shards, skipped, complete=False)
            storage.write_bytes(storage.join(out, MANIFEST), _manifest_bytes(manifest), endpoint_url, region)

        with tqdm(total=len(files), initial=start, unit="file", disable=not progress, desc="shards") as bar:
            for i in range(start, len(files)):
                rel = files[i]
                try:
                    members = encode_sample(src / rel, rel, keys[i], labels.get(rel, {}), sample_rate)
                except BadSample as e:
                    skipped.append({"source": rel, "reason": e.reason, "error": e.detail})
                    bar.update(1)
                    continue
                except (OSError, RuntimeError, ValueError) as e:
                    # One unreadable file (permissions, a codec corner case) must not stop
                    # a build of millions; it is listed in the manifest instead.
                    skipped.append({"source": rel, "reason": "read_error", "error": f"{type(e).__name__}: {e}"})
                    bar.update(1)
                    continue
                size = _tar_size(keys[i], members)
                if writer is not None and max_bytes and writer.bytes + size > max_bytes:
                    finish(stop=i)
                    writer = None
                if writer is None:
                    name = f"shard-{len(shards):06d}.tar"
                    first = shards[-1]["sources"][1] if shards else 0
                    writer = _ShardWriter(out, name, first, tmp, endpoint_url, region)
                writer.add(keys[i], members)
                if writer.samples >= max_samples:
                    finish(stop=i + 1)
                    writer = None
                bar.update(1)
            if writer is not None:
                finish(stop=len(files))

    manifest = _manifest(sample_rate, build, shards, skipped, complete=True)
    storage.write_bytes(storage.join(out, MANIFEST), _manifest_bytes(manifest), endpoint_url, region)
    if progress:
        n = sum(s["samples"] for s in shards)
        print(f"{out}: {n} samples in {len(shards)} shards; {len(skipped)} files skipped", file=sys.stderr)
        for s in skipped[:20]:
            print(f"  skipped {s['source']}: {s['error']}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more (see manifest 'skipped')", file=sys.stderr)
    return manifest


def encode_sample(
    path: Path, rel: str, key: str, label: Mapping[str, str], sample_rate: int
) -> dict[str, bytes]:
    """One source file -> ``{"flac": ..., "json": ...}`` (raises BadSample / OSError)."""
    import soundfile as sf

    wave, orig_rate, channels = decode_audio(Path(path).read_bytes(), sample_rate, name=rel)
    # PCM_16 wraps around outside [-1, 1]; scale loud float sources down instead of
    # clipping them. The overall gain is free: COLA L2-normalises every clip anyway.
    peak = float(np.abs(wave).max())
    gain = 1.0 / peak if peak > 1.0 else 1.0
    buf = io.BytesIO()
    sf.write(buf, wave * np.float32(gain), sample_rate, format="FLAC", subtype="PCM_16")
    meta: dict[str, Any] = {
        "key": key,
        "source": rel,
        "duration": round(wave.shape[0] / sample_rate, 6),
        "orig_sample_rate": orig_rate,
        "orig_channels": channels,
        **label,
    }
    if gain != 1.0:
        meta["gain"] = gain
    return {"flac": buf.getvalue(), "json": _dumps(meta)}


class _ShardWriter:
    """One shard being written to a local temp file, published whole by :meth:`close`."""

    def __init__(self, out: str, name: str, first_source: int, tmp: str, endpoint_url: str, region: str):
        self.out, self.name, self.first = out, name, first_source
        self.endpoint_url, self.region = endpoint_url, region
        if storage.is_s3(out):
            self.path = Path(tmp, name)
        else:
            # Next to the destination so that publishing is an atomic rename.
            Path(out).mkdir(parents=True, exist_ok=True)
            self.path = Path(out, f".{name}.partial")
        self.tar = tarfile.open(self.path, "w", format=tarfile.GNU_FORMAT)
        self.samples = 0
        self.bytes = 2 * _BLOCK  # the end-of-archive marker

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.bytes += _tar_size(key, members)

    def close(self, stop_source: int) -> dict[str, Any]:
        self.tar.close()
        size, digest = self.path.stat().st_size, storage.sha256_file(self.path)
        url = storage.join(self.out, self.name)
        if storage.is_s3(self.out):
            storage.upload_file(self.path, url, self.endpoint_url, self.region)
            self.path.unlink()
        else:
            os.replace(self.path, url)
        return {
            "name": self.name,
            "bytes": size,
            "sha256": digest,
            "samples": self.samples,
            "sources": [self.first, stop_source],
        }


def _resume_point(
    out: str, build: Mapping[str, Any], sample_rate: int, files: list[str], endpoint_url: str, region: str
) -> tuple[list[dict[str, Any]], list[dict[str, str]], int]:
    """(complete shards to keep, their skipped files, index of the first file to do)."""
    try:
        manifest = read_manifest(out, endpoint_url, region)
    except FileNotFoundError:
        return [], [], 0
    old = manifest.get("build", {})
    if old != dict(build) or manifest.get("sample_rate") != sample_rate:
        raise ValueError(
            f"{storage.join(out, MANIFEST)} belongs to a build with other sources or settings "
            f"({old} at {manifest.get('sample_rate')} Hz, now {dict(build)} at {sample_rate} Hz); "
            "write to an empty folder or delete that one"
        )
    try:
        sizes = storage.list_sizes(out, ".tar", endpoint_url, region)
    except FileNotFoundError:
        sizes = {}
    kept = []
    for entry in manifest["shards"]:
        if sizes.get(_shard_url(out, entry["name"])) != entry["bytes"]:
            break  # this one and everything after it are rebuilt
        kept.append(entry)
    if manifest.get("complete") and len(kept) == len(manifest["shards"]):
        start = len(files)
    else:
        start = kept[-1]["sources"][1] if kept else 0
    done = set(files[:start])
    skipped = [s for s in manifest.get("skipped", []) if s.get("source") in done]
    return kept, skipped, start


def _manifest(sample_rate: int, build: Mapping[str, Any], shards: list, skipped: list, complete: bool) -> dict:
    return {
        "format": FORMAT,
        "sample_rate": sample_rate,
        "shards": list(shards),
        "complete": complete,
        "build": dict(build),
        "skipped": list(skipped),
    }


def _tar_size(key: str, members: Mapping[str, bytes]) -> int:
    """Bytes the members take in a tar: a header block each plus data padded to blocks."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for data in members.values())


def _listing_hash(files: list[str], labels: Mapping[str, Mapping[str, str]]) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode("utf-8") + b"\0" + _dumps(labels.get(rel, {})) + b"\n")
    return h.hexdigest()


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=None, separators=(",", ":")).encode("utf-8")
