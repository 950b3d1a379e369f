"""What a shard folder is made of: the format's constants, :class:`ShardError` /
:class:`ShardProblem`, the member-name and key rules, and the JSON encoding of manifests
and sample metadata. The layout is described in :mod:`cola_ray.data.shards`."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from typing import Any, Mapping

from cola_ray.data.audio import AUDIO_SUFFIXES

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


# ---- JSON ------------------------------------------------------------------------------

def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=None, separators=(",", ":")).encode("utf-8")
