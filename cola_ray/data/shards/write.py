"""Writing shards: :func:`build_shards` packs a folder of audio files into FLAC WebDataset
shards and their manifest, resuming a build cut short."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cola_ray.data import storage
from cola_ray.data.audio import SUM_SQUARES_KEY, BadSample, clip_sum_squares, decode_audio
from cola_ray.data.shards.format import (
    FORMAT,
    MANIFEST,
    SOURCE_EXTENSIONS,
    _BLOCK,
    _TAR_MTIME,
    _dumps,
    _manifest_bytes,
)
from cola_ray.data.shards.read import _shard_url, read_manifest


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
    # The stored clip's sum of squares, from its own int16 samples: data.decode=seek then
    # normalises exactly as a full decode would, reading only the crops.
    pcm, _, _ = decode_audio(buf.getvalue(), sample_rate, name=rel, pcm16=True)
    meta[SUM_SQUARES_KEY] = clip_sum_squares(pcm)
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
