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

# The package by job: format (constants, errors, member names), read (streaming reads
# checked against the manifest, listing), write (build_shards), verify (verify_shards).
# Every name below was importable from the single module ``cola_ray.data.shards``.
from cola_ray.data.shards.format import (
    FORMAT,
    MANIFEST,
    MAX_MEMBER_BYTES,
    PICKLE_SUFFIXES,
    SAMPLE_SUFFIXES,
    SOURCE_EXTENSIONS,
    ShardError,
    ShardProblem,
    key_problem,
    split_member_name,
)
from cola_ray.data.shards.read import iter_samples, manifest_entry, read_manifest, sample_meta, shard_urls
from cola_ray.data.shards.verify import verify_shards
from cola_ray.data.shards.write import build_shards, encode_sample, find_audio_files, make_keys, read_labels

__all__ = [
    "FORMAT", "MANIFEST", "MAX_MEMBER_BYTES", "PICKLE_SUFFIXES", "SAMPLE_SUFFIXES", "SOURCE_EXTENSIONS",
    "ShardError", "ShardProblem", "key_problem", "split_member_name",
    "iter_samples", "manifest_entry", "read_manifest", "sample_meta", "shard_urls",
    "verify_shards",
    "build_shards", "encode_sample", "find_audio_files", "make_keys", "read_labels",
]
