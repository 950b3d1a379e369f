"""Reading shards: :func:`iter_samples` streams one tar (checked against its manifest entry
when given one), :func:`read_manifest` / :func:`manifest_entry` / :func:`shard_urls` list
a shard folder."""

from __future__ import annotations

import bz2
import collections
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile
from typing import IO, Any, Iterator, Mapping

from cola_ray.data import storage
from cola_ray.data.audio import BadSample
from cola_ray.data.shards.format import (
    FORMAT,
    MANIFEST,
    MAX_MEMBER_BYTES,
    PICKLE_SUFFIXES,
    SAMPLE_SUFFIXES,
    _BLOCK,
    ShardError,
    key_problem,
    split_member_name,
)


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
            raise ShardError(shard_name, size_problem(size, expected["bytes"]))
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


def size_problem(size: int, expected: int) -> str:
    """The words for a shard whose size is not its manifest's, in the pipeline's quarantine
    and in ``cola-ray shards verify`` alike."""
    return f"size is {size} bytes, the manifest says {expected} (truncated or replaced)"


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
