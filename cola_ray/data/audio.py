"""Bytes -> mono float32 wave at the target rate, and the COLA pair sampler.

Pure functions, numpy in and out, so the data workers and the tests need neither Ray
nor a GPU. Anything wrong with one sample raises :class:`BadSample` with a ``reason``
the pipeline counts against its error budget::

    wave, orig_rate, orig_channels = decode_audio(flac_bytes, 16000)   # (T,) float32
    anchor, positive = crop_pair(wave, 15600, rng)                     # (15600,) each
    [(anchor, positive)] = seek_crop_pairs(flac_bytes, 15600, rng)     # reads only the crops

Pair sampling follows the authors' code (``cola/contrastive.py``): the whole clip is
L2-normalised, then two independent uniform random crops are cut (they may overlap);
clips shorter than a crop are zero-padded, centred.
"""

from __future__ import annotations

import io
import re
from typing import Mapping

import numpy as np

AUDIO_SUFFIXES = ("flac", "wav", "ogg", "mp3")
"""Member suffixes read as audio, in order of preference when a sample has several."""

PCM16_SUBTYPES = ("PCM_16",)
"""soundfile subtypes whose int16 read is the float32 read x 32768 exactly (16-bit PCM, WAV or FLAC)."""

SUM_SQUARES_KEY = "sum_squares"
"""Sample json field: the clip's ``sum(wave**2)`` (:func:`clip_sum_squares`), written by ``shards build``;
with it ``data.decode=seek`` normalises exactly as a full decode (:func:`seek_crop_pairs`)."""

BAD_REASONS = ("decode_error", "empty", "non_finite", "too_short", "no_audio_member", "bad_json", "bad_key")


class BadSample(Exception):
    """One sample that cannot be used; ``reason`` is one of :data:`BAD_REASONS`.

    The message names the sample (``sample``: a key, a path or ``shard:key``) so that
    a count in MLflow can be traced back to the data.
    """

    def __init__(self, reason: str, sample: str = "<bytes>", detail: str = ""):
        if reason not in BAD_REASONS:
            raise ValueError(f"unknown BadSample reason {reason!r}; known: {BAD_REASONS}")
        self.reason = reason
        self.sample = sample
        self.detail = detail
        super().__init__(f"{sample}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # keep reason/sample when pickled across Ray workers
        return (type(self), (self.reason, self.sample, self.detail))


def decode_audio(
    data: bytes, target_rate: int, *, name: str = "<bytes>", pcm16: bool = False,
) -> tuple[np.ndarray, int, int]:
    """Decode any format soundfile reads into ``(wave, orig_rate, orig_channels)``.

    ``wave``: (T,) float32, mono (mean over channels), resampled to ``target_rate``
    (``torchaudio.functional.resample``, so T = ceil(frames * target / orig)).
    With ``pcm16``, a 16-bit mono source at ``target_rate`` comes back as its int16 samples
    instead (``wave / 32768`` is the float32 wave, exactly): no float pass over the clip,
    for the int16 transport (:func:`crop_pcm_pairs`); other sources still give float32.
    Raises :class:`BadSample` ``decode_error`` (not audio / corrupt), ``empty`` (no
    frames) or ``non_finite`` (NaN / inf, possible in float WAV).
    """
    import soundfile as sf

    if not data:
        raise BadSample("empty", name, "zero bytes")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            as_pcm = pcm16 and f.subtype in PCM16_SUBTYPES and f.channels == 1 and rate == target_rate
            frames = f.read(dtype="int16" if as_pcm else "float32", always_2d=True)  # (T, C)
    except Exception as e:  # libsndfile reports corrupt data with several exception types
        raise BadSample("decode_error", name, _error_detail(e)) from None
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise BadSample("empty", name, "no audio frames")
    if as_pcm:
        return np.ascontiguousarray(frames[:, 0]), int(rate), 1
    if not np.isfinite(frames).all():
        raise BadSample("non_finite", name, "NaN or inf samples")
    channels = int(frames.shape[1])
    wave = frames.mean(axis=1, dtype=np.float32) if channels > 1 else frames[:, 0]
    wave = resample(wave, int(rate), int(target_rate))
    return np.ascontiguousarray(wave, dtype=np.float32), int(rate), channels


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """(T,) -> (ceil(T * target / orig),) float32; the same array if the rates match."""
    if orig_rate == target_rate:
        return wave
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), orig_rate, target_rate)
    return out.numpy()


def audio_member(members: Mapping[str, bytes], sample: str = "<sample>") -> tuple[str, bytes]:
    """``(suffix, bytes)`` of a sample's audio member, first in :data:`AUDIO_SUFFIXES` order.

    ``members`` maps suffix -> bytes (what ``shards.iter_samples`` yields). Raises
    :class:`BadSample` ``no_audio_member`` when there is none.
    """
    for suffix in AUDIO_SUFFIXES:
        if suffix in members:
            return suffix, members[suffix]
    raise BadSample("no_audio_member", sample, f"members: {sorted(members)}")


def l2_normalize(wave: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """(T,) -> (T,) float32 ``wave / sqrt(max(sum(wave**2), eps))``.

    The eps bounds the squared norm, as ``tf.math.l2_normalize`` in the authors' code does,
    so silence stays silence instead of becoming NaN.
    """
    wave = np.asarray(wave, dtype=np.float32)
    return (wave * _inv_norm(wave, eps)).astype(np.float32, copy=False)


def _inv_norm(wave: np.ndarray, eps: float = 1e-9) -> np.float32:
    """``1 / sqrt(max(sum(wave**2), eps))``, the sum in float64."""
    return _gain(_sum_squares(wave), eps)


def _gain(sum_squares: float, eps: float = 1e-9) -> np.float32:
    """The L2 gain from a clip's sum of squares: ``float32(1 / sqrt(max(sum_squares, eps)))``,
    the one formula every path uses (so equal sums give equal gains)."""
    return np.float32(1.0 / np.sqrt(max(float(sum_squares), eps)))


def _pcm16_squares(pcm: np.ndarray) -> int:
    """``sum(pcm**2)`` of int16 samples, exact (int64)."""
    x = pcm.astype(np.int64)
    return int(np.einsum("i,i->", x, x))


def clip_sum_squares(wave: np.ndarray) -> float:
    """A decoded clip's ``sum(wave**2)`` exactly as the full path computes it for its L2 norm
    (float64; int16 samples count as ``pcm / 32768``): what ``shards build`` stores as
    :data:`SUM_SQUARES_KEY` so that the seek path normalises exactly."""
    return _pcm16_squares(wave) * 2.0 ** -30 if wave.dtype == np.int16 else _sum_squares(wave)


def _inv_norm_pcm16(pcm: np.ndarray, eps: float = 1e-9) -> np.float32:
    """:func:`_inv_norm` of ``pcm / 32768`` from the int16 samples: the sum of squares in int64,
    then scaled by 2^-30. The same float32 as the float path's: there every square is a
    multiple of 2^-30 and their float64 sum is exact while below 2^23 (any clip under 2^23
    samples, 8.7 minutes at 16 kHz), so both compute the same float64 before the same root."""
    return _gain(_pcm16_squares(pcm) * 2.0 ** -30, eps)


def _sum_squares(x: np.ndarray) -> float:
    """``sum(x**2)`` in float64. ``einsum``, not ``x @ x``: the matmul goes to OpenBLAS, whose
    threads cost ~2-5 ms per 10 s clip on a loaded machine (cProfile: 60% of a FLAC full
    decode at k=1), einsum ~0.05 ms in this thread."""
    x64 = x.astype(np.float64)
    return float(np.einsum("i,i->", x64, x64))


def pad_center(wave: np.ndarray, n: int) -> np.ndarray:
    """(T,) -> (n,) zero-padded with the clip in the middle (left gets the smaller half).

    Clips already ``n`` long or longer come back unchanged.
    """
    missing = n - wave.shape[0]
    if missing <= 0:
        return wave
    left = missing // 2
    return np.pad(wave, (left, missing - left))


def crop_pair(
    wave: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    l2_normalize: bool = True,
    noise_std: float = 0.0,
    short: str = "pad",
    name: str = "<clip>",
    gains: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut an (anchor, positive) pair, each (n,) float32, from one clip (T,).

    1. the whole clip is L2-normalised (if ``l2_normalize``; eps 1e-9);
    2. a clip shorter than ``n`` is zero-padded, centred (``short="pad"``), or rejected
       with :class:`BadSample` ``too_short`` (``short="skip"``);
    3. anchor and positive start at independent uniform offsets in [0, T - n];
    4. Gaussian noise of std ``noise_std`` is added to the positive only.

    The draws come from ``rng`` in that order, so the same generator state gives the same
    pair. ``name`` only labels the error. ``gains``, if a list, receives the float32 factor
    the crops were multiplied by (as in :func:`seek_crop_pairs`).
    """
    if wave.ndim != 1:
        raise ValueError(f"crop_pair expects a mono wave of shape (T,), got {wave.shape}")
    if n < 1:
        raise ValueError(f"crop length must be >= 1, got {n}")
    if short not in ("pad", "skip"):
        raise ValueError(f"short must be 'pad' or 'skip', got {short!r}")
    clip = np.asarray(wave, dtype=np.float32)
    # Scale only the two crops, not the whole clip: same numbers, a third less work per
    # pair on 10 s clips (zero-padding does not change the norm).
    scale = _inv_norm(clip) if l2_normalize else np.float32(1.0)
    if gains is not None:
        gains.append(scale)
    if clip.shape[0] < n:
        if short == "skip":
            raise BadSample("too_short", name, f"{clip.shape[0]} samples < segment of {n}")
        clip = pad_center(clip, n)
    a0, p0 = crop_offsets(clip.shape[0], n, rng)
    anchor = clip[a0 : a0 + n] * scale
    positive = clip[p0 : p0 + n] * scale
    return anchor, add_positive_noise(positive, noise_std, rng)


def crop_offsets(length: int, n: int, rng: np.random.Generator) -> tuple[int, int]:
    """The (anchor, positive) start offsets, independent uniform in [0, max(length, n) - n].

    The one place crops are drawn, shared by :func:`crop_pair` (full decode),
    :func:`seek_crop_pair` and the node-local cache, so the same generator state gives the
    same crops on every path. Padded clips (``length < n``) go through the same draw
    (offsets are then 0), so the number of values taken from ``rng`` does not depend on
    the clip's length.
    """
    high = max(length, n) - n + 1
    a0, p0 = (int(x) for x in rng.integers(0, high, size=2))
    return a0, p0


def crop_pcm_pairs(
    pcm: np.ndarray, n: int, rng: np.random.Generator, *, k: int = 1, l2_normalize: bool = True,
    short: str = "pad", name: str = "<clip>",
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.float32]:
    """:func:`crop_pair` ``k`` times on a 16-bit clip's int16 samples (T,) (``decode_audio(...,
    pcm16=True)``), without noise: ``(k pairs of (n,) int16, gain)`` such that
    ``(pair * 2^-15) * gain`` in float32 is what :func:`crop_pair` gives on ``pcm / 32768``
    for the same generator state, bit for bit (the same draws, the same gain)."""
    gain = _inv_norm_pcm16(pcm) if l2_normalize else np.float32(1.0)
    if pcm.shape[0] < n:
        if short == "skip":
            raise BadSample("too_short", name, f"{pcm.shape[0]} samples < segment of {n}")
        pcm = pad_center(pcm, n)
    pairs = []
    for _ in range(k):
        a0, p0 = crop_offsets(pcm.shape[0], n, rng)
        # Copies: a view would keep the whole clip alive until its block is stacked.
        pairs.append((pcm[a0 : a0 + n].copy(), pcm[p0 : p0 + n].copy()))
    return pairs, gain


def add_positive_noise(positive: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) -> (n,) float32 plus N(0, noise_std) drawn from ``rng`` after the offsets (if > 0)."""
    if noise_std > 0:
        positive = positive + rng.normal(0.0, noise_std, size=positive.shape[0]).astype(np.float32)
    return positive


# ---- seek decoding ---------------------------------------------------------------------

SEEK_EXACT_SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "PCM_S8", "PCM_U8", "FLOAT", "DOUBLE", "VORBIS")
"""soundfile subtypes whose seek + read returns exactly the frames a full decode gives
(checked in tests/test_throughput.py). Opus (libopus pre-skip / 48 kHz internal rate) and
MP3 (not frame-exact in libsndfile, measured) are not seek-exact: they fall back to a
full decode."""


def seek_crop_pairs(
    data: bytes,
    n: int,
    rng: np.random.Generator,
    *,
    k: int = 1,
    target_rate: int = 16000,
    l2_normalize: bool = True,
    noise_std: float = 0.0,
    short: str = "pad",
    name: str = "<bytes>",
    gains: list | None = None,
    sum_squares: float | None = None,
    pcm16: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (anchor, positive) pairs, each (n,) float32, reading only the crops' frames.

    ``gains``, if given a list, receives the one float32 factor the crops were multiplied by
    (the L2 scale, estimated or exact, 1.0 without ``l2_normalize``): the int16 transport
    sends the unscaled samples and this factor. With ``pcm16`` (and no noise), a 16-bit mono
    source gives its int16 crops unscaled instead (``crop / 32768 * gain`` is the float pair).

    Opens the clip once, draws each pair's offsets with :func:`crop_offsets` from ``rng``
    exactly as :func:`crop_pair` does on the fully decoded clip, then seeks and reads only
    those 2 x n frames (down-mixed by the same channel mean). With the same generator state
    the crops are the same samples as ``crop_pair(decode_audio(data)[0], n, rng, ...)`` gives;
    the scale:

    - ``l2_normalize=False``: identical to the full path.
    - ``l2_normalize=True`` and ``sum_squares`` given (the clip's ``sum(wave**2)`` as the full
      path computes it, float64; ``cola-ray shards build`` stores it in every sample's json
      as ``sum_squares``, :data:`SUM_SQUARES_KEY`): identical to the full path, bit for bit.
    - ``l2_normalize=True`` without it: the full path divides by the whole clip's L2 norm,
      which needs every sample. Seek divides both crops by the norm *estimated* from the
      frames it read: ``sqrt(T * mean square of the 2 crops)`` (k pairs: all 2k crops), the
      clip's norm if its energy is stationary. Same crops, a per-clip gain that differs.

    Falls back to a full decode + :func:`crop_pair` (same draws, so the same pairs as the
    full path) when seeking cannot be exact or gains nothing: a subtype outside
    :data:`SEEK_EXACT_SUBTYPES` (Opus, MP3), a rate other than ``target_rate`` (resampling
    a crop is not resampling the clip), or a clip shorter than ``n``. NaN / inf are only
    detected in the frames read. Raises :class:`BadSample` like :func:`decode_audio`.
    """
    import soundfile as sf

    if not data:
        raise BadSample("empty", name, "zero bytes")
    crops: list[tuple[np.ndarray, np.ndarray]] = []
    noises: list[np.ndarray | None] = []
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            length, channels = int(f.frames), int(f.channels)
            if length <= 0 or channels <= 0:
                raise BadSample("empty", name, "no audio frames")
            if f.subtype not in SEEK_EXACT_SUBTYPES or f.samplerate != target_rate or length < n:
                crops = []  # fall back, below, outside the open file
            else:
                as_pcm = pcm16 and not noise_std and f.subtype in PCM16_SUBTYPES and channels == 1
                for _ in range(k):
                    a0, p0 = crop_offsets(length, n, rng)
                    # Noise is drawn right after its pair's offsets, in crop_pair's order.
                    noises.append(rng.normal(0.0, noise_std, size=n).astype(np.float32) if noise_std > 0 else None)
                    crops.append((_read_mono(f, a0, n, as_pcm), _read_mono(f, p0, n, as_pcm)))
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("decode_error", name, _error_detail(e)) from None
    if not crops:
        wave, _, _ = decode_audio(data, target_rate, name=name)
        if gains is not None:
            gains.append(_inv_norm(wave) if l2_normalize else np.float32(1.0))
        return [crop_pair(wave, n, rng, l2_normalize=l2_normalize, noise_std=noise_std, short=short, name=name)
                for _ in range(k)]
    pcm = crops[0][0].dtype == np.int16
    for a, p in crops:
        if a.shape[0] != n or p.shape[0] != n:
            raise BadSample("decode_error", name, f"short read at a seek ({a.shape[0]}, {p.shape[0]} of {n})")
        if not pcm and not (np.isfinite(a).all() and np.isfinite(p).all()):
            raise BadSample("non_finite", name, "NaN or inf samples")
    if not l2_normalize:
        scale = np.float32(1.0)
    elif sum_squares is not None:
        scale = _gain(sum_squares)
    else:
        # int16 crops: the float crops' squares summed exactly, as integers (see _inv_norm_pcm16).
        sq = (sum(_pcm16_squares(a) + _pcm16_squares(p) for a, p in crops) * 2.0 ** -30 if pcm
              else sum(_sum_squares(a) + _sum_squares(p) for a, p in crops))
        scale = _gain(sq * length / (2 * k * n))
    if gains is not None:
        gains.append(scale)
    if pcm:
        return crops
    out = []
    for (a, p), noise in zip(crops, noises):
        positive = p * scale
        out.append((a * scale, positive + noise if noise is not None else positive))
    return out


def _read_mono(f, start: int, n: int, pcm16: bool = False) -> np.ndarray:
    """(n,) float32 frames [start, start + n) of an open SoundFile, channel mean as decode_audio
    (``pcm16``: the int16 frames of a mono file)."""
    f.seek(start)
    frames = f.read(n, dtype="int16" if pcm16 else "float32", always_2d=True)  # (n, C)
    return frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else np.ascontiguousarray(frames[:, 0])


def _error_detail(e: Exception) -> str:
    # libsndfile's messages quote the BytesIO's repr; drop the address so reports are stable.
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "data", f"{type(e).__name__}: {e}")


REMAINDERS = ("end", "drop", "pad")
"""What :func:`split_segments` does with the last ``T mod n`` samples of a clip."""


def split_segments(wave: np.ndarray, n: int, remainder: str = "end") -> tuple[np.ndarray, np.ndarray]:
    """A clip (T,) -> ``(segments (K, n) float32, starts (K,) int64)``, each segment L2-normalised.

    Non-overlapping segments from sample 0; the last ``T mod n`` samples are handled by
    ``remainder`` (why ``end`` is the default: :mod:`cola_ray.downstream.embed`): ``"end"`` adds a segment ending at the
    clip's last sample, ``"drop"`` leaves them out, ``"pad"`` zero-pads them to ``n``.
    A clip of at most ``n`` samples is one segment, zero-padded and centred (start 0).
    """
    if wave.ndim != 1:
        raise ValueError(f"expected a mono wave (T,), got {wave.shape}")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    t = wave.shape[0]
    if t <= n:
        return l2_normalize(pad_center(wave, n))[None, :], np.zeros(1, np.int64)
    starts = list(range(0, t - n + 1, n))
    pieces = [wave[s : s + n] for s in starts]
    if t % n:
        if remainder == "end":
            starts.append(t - n)
            pieces.append(wave[t - n :])
        elif remainder == "pad":
            last = len(starts) * n
            starts.append(last)
            pieces.append(np.pad(wave[last:], (0, n - (t - last))))
    segments = np.stack([l2_normalize(p) for p in pieces]).astype(np.float32, copy=False)
    return segments, np.asarray(starts, dtype=np.int64)
