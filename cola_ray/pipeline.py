"""Ray Data: shards -> decode_and_crop -> rows of waveform pairs.

Data workers only read, decode and crop. They never compute features: log-mel runs
on the training device (on GPU nodes, CPU log-mel would cost ~8 cores per GPU).

    shard urls --(random order each epoch)--> decode_and_crop (Ray tasks, one per shard)
        --> rows {"anchor": float32 (S,), "positive": float32 (S,)}
        --> streaming_split across Ray Train workers --> iter_torch_batches

Every resource a data task asks for is set here. Bad samples are skipped and counted
by reason in a :class:`SampleCounter` actor; training workers read it to log the counts
and to enforce the error budget.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import ray

from cola_ray import audio, shards, storage
from cola_ray.config import DataConfig


@ray.remote(num_cpus=0)
class SampleCounter:
    """Good / bad sample tallies of one run, fed by every decode task."""

    def __init__(self) -> None:
        self.good = 0
        self.bad: collections.Counter[str] = collections.Counter()
        self.bad_by_shard: collections.Counter[str] = collections.Counter()
        self.bad_shards: dict[str, str] = {}

    def add(self, shard: str, good: int, bad: dict[str, int], shard_error: str = "") -> None:
        self.good += good
        self.bad.update(bad)
        self.bad_by_shard[shard] += sum(bad.values())
        if shard_error:
            self.bad_shards[shard] = shard_error

    def snapshot(self) -> dict[str, Any]:
        return {
            "good": self.good,
            "bad": dict(self.bad),
            "worst_shards": self.bad_by_shard.most_common(5),
            "bad_shards": dict(self.bad_shards),
        }


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

    def report(self, counter: Any | None) -> None:
        """Add this read's tallies to the run's counter before the task ends (so a reader of
        the counter never sees a finished shard uncounted); a lost counter only loses counts."""
        if counter is None:
            return
        try:
            ray.get(counter.add.remote(self.shard, self.good, dict(self.bad), self.error), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            logging.getLogger(__name__).warning("could not count shard %s: %s", self.shard, e)


def decoded_clips(
    url: str, sample_rate: int, tally: ShardTally, *, endpoint_url: str = "", region: str = "",
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> Iterator[tuple[str, dict[str, Any], np.ndarray]]:
    """Every usable clip of one shard: ``(key, json metadata, mono float32 wave (T,))``.

    The one place shards become audio, for pre-training and downstream alike. Samples
    that cannot be used are skipped and counted in ``tally.bad`` by reason; a shard that
    cannot be read at all is counted once (``bad_shard``) and named in ``tally.error``.
    ``keep(meta)`` filters samples before their audio is decoded. Callers count
    ``tally.good`` themselves, once a clip has really been used.
    """
    try:
        with storage.open_input(url, endpoint_url=endpoint_url, region=region) as stream:
            for item in shards.iter_samples(stream, tally.shard):
                if isinstance(item, audio.BadSample):
                    tally.bad[item.reason] += 1
                    continue
                key, members = item
                try:
                    meta = shards.sample_meta(members, key)  # a malformed json makes the sample bad
                    if keep is not None and not keep(meta):
                        continue
                    _, raw = audio.audio_member(members, key)
                    wave, _, _ = audio.decode_audio(raw, sample_rate, name=key)
                except audio.BadSample as e:
                    tally.bad[e.reason] += 1
                    continue
                yield key, meta, wave
    except shards.ShardError as e:
        tally.bad["bad_shard"] += 1
        tally.error = str(e)


def decode_and_crop(
    row: dict[str, Any], cfg: dict[str, Any], counter: Any | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """One shard -> ``pairs_per_clip`` pairs per good clip, each ``(segment_samples,)`` float32.

    Runs in a Ray Data task. Samples that cannot be used are skipped and counted by
    reason; a shard that cannot be read at all is counted once and named.
    """
    data = DataConfig(**cfg)
    tally = ShardTally(os.path.basename(row["shard"]))
    # Fresh entropy for every read of a shard: pairs differ from epoch to epoch.
    rng = np.random.default_rng()
    try:
        for key, _, wave in decoded_clips(row["shard"], data.sample_rate, tally,
                                          endpoint_url=data.s3_endpoint_url, region=data.s3_region):
            try:
                pairs = [
                    audio.crop_pair(wave, data.segment_samples, rng, l2_normalize=data.clip_l2_normalize,
                                    noise_std=data.positive_noise_std, short=data.short_clips, name=key)
                    for _ in range(data.pairs_per_clip)
                ]
            except audio.BadSample as e:
                tally.bad[e.reason] += 1
                continue
            for anchor, positive in pairs:
                yield {"anchor": anchor, "positive": positive}
            tally.good += 1
    finally:
        tally.report(counter)


def list_shards(data: DataConfig) -> list[str]:
    """Shard URLs at ``data.shards``; raises FileNotFoundError naming the path if none."""
    urls = shards.shard_urls(data.shards, endpoint_url=data.s3_endpoint_url, region=data.s3_region)
    if not urls:
        raise FileNotFoundError(f"no *.tar shards found at {data.shards!r}")
    return urls


def read_pairs(data: DataConfig, counter: Any | None = None, urls: list[str] | None = None) -> ray.data.Dataset:
    """The training dataset: a lazy, streaming Ray Dataset of waveform pairs.

    Executed afresh every epoch, so crops (and the shard order) change every epoch.
    Fails fast, naming the path, when no shard is found.
    """
    urls = urls if urls is not None else list_shards(data)
    if not urls:
        raise FileNotFoundError(f"no *.tar shards found at {data.shards!r}")
    ds = ray.data.from_items([{"shard": u} for u in urls], override_num_blocks=len(urls))
    if data.shuffle_shards:
        # One shard per block: a fresh block order each epoch is a fresh shard order,
        # without random_shuffle's all-to-all tasks before the first decode.
        ds = ds.randomize_block_order()
    remote_args: dict[str, Any] = {"num_cpus": data.decode_num_cpus}
    if data.decode_resources:
        remote_args["resources"] = dict(data.decode_resources)
    if data.decode_concurrency:
        remote_args["compute"] = ray.data.TaskPoolStrategy(size=data.decode_concurrency)
    return ds.flat_map(
        decode_and_crop,
        fn_kwargs={"cfg": _plain(data), "counter": counter},
        **remote_args,
    )


def _plain(data: DataConfig) -> dict[str, Any]:
    return dataclasses.asdict(data)
