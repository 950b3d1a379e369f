"""Exactly-once epochs: which clips an epoch has trained on, across restarts.

Every pair names its clip exactly (``shard_idx``, ``sample_idx``: :func:`cola_ray.data.pipeline.decode_and_crop`).
Each training worker records the clips of the batches it steps on (:class:`EpochClips`);
at every checkpoint the ranks' records are gathered and saved, as
``TrainState.epoch_clips`` (per shard file name, the clip ordinals, delta-encoded and
compressed); a restore (worker lost, driver restarted, another ``train.num_workers``) hands
them to the :class:`cola_ray.data.pipeline.EpochLedger`, so the rest of the epoch delivers
exactly the clips not trained on yet. Steps taken after the checkpoint are undone with the
weights, and so are their clips: the set of clips behind the model is each clip once.

At each epoch's end the ranks' records give ``data/epoch_clips`` (distinct clips trained on
in the epoch, restored ones included) and ``data/epoch_repeats`` (deliveries beyond a
clip's ``data.pairs_per_clip`` pairs, or of a clip the checkpoint already had: 0 unless the
guarantee broke).

Cost at AudioSet scale (2M clips): the record is an int64 per pair on each worker (16 MB
at 2M pairs over all ranks) and, in ``state.json``, ~1-4 bits per clip trained on after
compression (a few hundred kB mid-epoch, about nothing at an epoch's end, which resets it);
a resumed epoch decodes its already-trained clips again without delivering them.
"""

from __future__ import annotations

import base64
import logging
import os
import zlib
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from cola_ray.model import distributed

log = logging.getLogger(__name__)

RESUME_EPOCH = ("continue", "restart")
"""``data.resume_epoch``: ``continue`` the interrupted epoch with exactly its remaining clips
(refused when the checkpoint cannot say which, or names another dataset), or ``restart`` it."""


# ---- the state's encoding ---------------------------------------------------------------

def encode(ordinals: np.ndarray) -> str:
    """Sorted unique clip ordinals -> a short ASCII string (deltas, zlib, base64)."""
    ordinals = np.unique(np.asarray(ordinals, np.int64))
    deltas = np.diff(ordinals, prepend=0).astype(np.uint32)
    return base64.b64encode(zlib.compress(deltas.tobytes(), 9)).decode("ascii")


def decode(text: str) -> np.ndarray:
    """:func:`encode`'s inverse: the sorted ordinals (int64)."""
    deltas = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint32)
    return np.cumsum(deltas.astype(np.int64))


def shard_versions(urls: list[str], manifest: Mapping[str, Any] | None) -> dict[str, str]:
    """Shard file name -> what identifies its content: the manifest's ``sha256``, else ``""``
    (a shard without a manifest entry cannot be seen to change)."""
    known = {os.path.basename(s["name"]): s.get("sha256", "") for s in (manifest or {}).get("shards", [])}
    return {os.path.basename(u): known.get(os.path.basename(u), "") for u in urls}


def resume_skip(epoch_clips: Mapping[str, str] | None, saved_shards: Mapping[str, str] | None,
                shards: Mapping[str, str], mode: str, where: str) -> dict[str, np.ndarray]:
    """The clips the resumed epoch must not deliver again, per shard; raises ``ValueError``
    (naming ``where``, the checkpoint, and both datasets) when that cannot be known.

    ``epoch_clips``/``saved_shards``: the checkpoint's record and shard versions (None in a
    checkpoint written before exactly-once epochs); ``shards``: this run's. A shard whose
    version changed restarts its part of the epoch (warned, naming it).
    """
    if mode == "restart":
        return {}
    if epoch_clips is None or saved_shards is None:
        raise ValueError(
            f"{where} does not record which clips its epoch had trained on (written before exactly-once "
            "epochs): resuming it would repeat or skip clips. Start the epoch over with data.resume_epoch=restart")
    if not epoch_clips:
        return {}
    gone = sorted(set(saved_shards) - set(shards))
    new = sorted(set(shards) - set(saved_shards))
    if gone or new:
        raise ValueError(
            f"{where} was trained on another set of shards ({len(saved_shards)} shards; this run has "
            f"{len(shards)}: {len(gone)} missing, e.g. {gone[:3]}, {len(new)} new, e.g. {new[:3]}). Its epoch "
            "cannot be continued exactly; start it over with data.resume_epoch=restart")
    changed = sorted(n for n in epoch_clips if saved_shards.get(n) != shards.get(n))
    if changed:
        log.warning("shards changed since %s: %s; their part of the epoch starts over", where,
                    ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""))
    return {n: decode(t) for n, t in epoch_clips.items() if n not in changed}


def restored_record(epoch_clips: Mapping[str, str] | None) -> dict[str, np.ndarray]:
    """What the checkpoint's epoch had trained on, per shard ({} if it cannot say): the start
    of the epoch's record when it is started over (``data.resume_epoch=restart``), so the
    clips delivered again are counted in ``data/epoch_repeats``."""
    return {n: decode(t) for n, t in (epoch_clips or {}).items()}


# ---- the workers' record ------------------------------------------------------------------

COMPACT_EVERY = 512
"""Steps of clip keys an :class:`EpochClips` keeps on the device before one copy to the host."""


class EpochClips:
    """This rank's record of the epoch in progress: the clips of the batches it stepped on
    (with multiplicity), plus what the checkpoint had (``restored``, the same on every rank).
    :meth:`gathered` and :meth:`epoch_metrics` are collectives: every rank calls them."""

    def __init__(self, names: list[str], pairs_per_clip: int) -> None:
        self.names = names  # shard_idx -> shard file name (this run's shard list)
        self.index = {n: i for i, n in enumerate(names)}
        self.k = max(1, pairs_per_clip)
        self.parts: list[Any] = []  # clip keys (shard_idx << 32 | sample_idx) of steps: tensors or arrays
        self.restored: dict[str, np.ndarray] = {}

    def begin(self, restored: Mapping[str, np.ndarray] | None = None) -> None:
        self.parts, self.restored = [], dict(restored or {})

    def add(self, shard_idx: Any, sample_idx: Any) -> None:
        """One step's batch: ``(B,)`` tensors (on the training device) or arrays.

        The keys stay where the batch is: copying them to the host at every step would make
        the host wait for the step's queued work on a GPU. :meth:`_local` brings them over
        every ``COMPACT_EVERY`` steps and at the epoch's collectives."""
        if isinstance(shard_idx, torch.Tensor):
            self.parts.append((shard_idx.long() << 32) | sample_idx.long())
        else:
            self.parts.append((np.asarray(shard_idx, np.int64) << 32) | np.asarray(sample_idx, np.int64))
        if len(self.parts) >= COMPACT_EVERY:
            self.parts = [self._local()]

    def _local(self) -> np.ndarray:
        """This rank's keys so far as one host array (one device-to-host copy)."""
        on_device = [p for p in self.parts if isinstance(p, torch.Tensor)]
        host = [p for p in self.parts if not isinstance(p, torch.Tensor)]
        if on_device:
            host.append(torch.cat(on_device).cpu().numpy())
        return np.concatenate(host) if host else np.zeros(0, np.int64)

    def _all_keys(self) -> np.ndarray:
        """Every rank's keys, with multiplicity (one all_gather_object)."""
        local = self._local()
        self.parts = [local]
        if not (dist.is_available() and dist.is_initialized()) or distributed.world_size() == 1:
            return local
        out: list[Any] = [None] * distributed.world_size()
        dist.all_gather_object(out, local)
        return np.concatenate(out)

    def gathered(self) -> dict[str, str]:
        """The epoch so far (restored + every rank's), per shard name, encoded for ``state.json``."""
        per_shard = {n: [v] for n, v in self.restored.items()}
        keys = np.unique(self._all_keys())
        for idx in np.unique(keys >> 32):
            per_shard.setdefault(self.names[int(idx)], []).append(keys[(keys >> 32) == idx] & 0xFFFFFFFF)
        return {n: encode(np.concatenate(v)) for n, v in per_shard.items()}

    def epoch_metrics(self) -> dict[str, float]:
        """``data/epoch_clips`` and ``data/epoch_repeats`` of the epoch that just ended."""
        keys, counts = np.unique(self._all_keys(), return_counts=True)
        repeats = int(np.maximum(counts - self.k, 0).sum())
        restored = again = 0
        for name, ords in self.restored.items():
            restored += len(ords)
            if name in self.index and len(keys):
                again += int(np.isin((np.int64(self.index[name]) << 32) | ords, keys).sum())
        return {"data/epoch_clips": float(restored + len(keys) - again), "data/epoch_repeats": float(repeats + again)}
