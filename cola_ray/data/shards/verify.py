"""Verifying a shard folder: :func:`verify_shards` reads every shard in full against the
manifest and lists what is wrong."""

from __future__ import annotations

from typing import Any, Mapping

from cola_ray.data import storage
from cola_ray.data.audio import BadSample, audio_member
from cola_ray.data.shards.format import MANIFEST, ShardError, ShardProblem
from cola_ray.data.shards.read import _Hashing, _shard_url, iter_samples, read_manifest, sample_meta, size_problem


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
            problems.append(ShardProblem(shard, size_problem(size, entry["bytes"])))
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
    try:
        with storage.open_input(shard, endpoint_url, region) as raw:
            # With a manifest entry, the pipeline's own checks (iter_samples(expected=...)):
            # a shard it quarantines is reported here in the same words.
            stream = _Hashing(raw) if entry is None else raw
            for item in iter_samples(stream, shard, expected=entry):
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
            if entry is None:
                stream.drain()
    except ShardError as e:
        found.append(e.detail)
    except OSError as e:
        return [ShardProblem(shard, f"cannot read: {e}")]
    out = [ShardProblem(shard, p) for p in found[:max_per_shard]]
    if len(found) > max_per_shard:
        out.append(ShardProblem(shard, f"... and {len(found) - max_per_shard} more problems"))
    return out
