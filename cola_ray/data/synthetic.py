"""A small synthetic audio corpus that COLA can learn something from, made in seconds.

Two levels of structure, so both halves of the method can be checked without a download:

- CLIP level: every clip draws its own parameters (pitch, harmonic weights, modulation
  rates, sweep range, noise band and colour, click rate ...) and keeps them for its whole
  length, so any 1 s crop of a clip resembles its other crops more than crops of other
  clips: the contrastive task is solvable.
- CLASS level: clips come from families with distinct spectro-temporal shapes (harmonic
  tones, FM chirps, band-pass noise, click trains, tone bursts, beating tones), so a
  linear probe on the learnt embedding can tell the classes apart.

::

    labels = make_corpus("corpus", n_clips=300)   # corpus/<family>/clip_00001.flac + labels.csv
    url = ensure_synthetic_shards("runs/_synthetic/shards", seed=0)   # the same, as shards, once
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np

_FORMATS = {
    "flac": ("FLAC", "PCM_16"),
    "wav": ("WAV", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


SYNTHETIC = "synthetic"
"""The value of ``data.shards`` (pre-training) and of a suite task that asks for this corpus."""


def make_corpus(
    out_dir: str | Path,
    n_clips: int = 300,
    seconds: float = 3.0,
    sample_rate: int = 16000,
    n_classes: int = 4,
    seed: int = 0,
    fmt: str = "flac",
) -> Path:
    """Write ``n_clips`` clips to ``out_dir/<family>/clip_00001.<fmt>``; return the labels CSV.

    Clip i belongs to family ``i % n_classes`` (balanced classes). The CSV
    (``out_dir/labels.csv``, rows ``path,label,split`` with paths relative to ``out_dir``)
    splits each class about 70/15/15 into train/validation/test. Same arguments -> same
    files, byte for byte.
    """
    import soundfile as sf

    if not 1 <= n_classes <= len(FAMILIES):
        raise ValueError(f"n_classes must be in 1..{len(FAMILIES)}, got {n_classes}")
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    if n_clips < 1 or seconds <= 0:
        raise ValueError(f"need n_clips >= 1 and seconds > 0, got {n_clips}, {seconds}")
    out = Path(out_dir)
    names = list(FAMILIES)[:n_classes]
    n = int(round(seconds * sample_rate))
    file_format, subtype = _FORMATS[fmt]
    rows = []
    for i in range(n_clips):
        label = names[i % n_classes]
        # One generator per clip, keyed by (seed, i): a clip does not depend on the others.
        rng = np.random.default_rng([seed, i])
        wave = synth_clip(label, n, sample_rate, rng)
        rel = f"{label}/clip_{i + 1:05d}.{fmt}"
        (out / label).mkdir(parents=True, exist_ok=True)
        sf.write(out / rel, wave, sample_rate, format=file_format, subtype=subtype)
        rows.append((rel, label))
    splits = _stratified_splits([label for _, label in rows], np.random.default_rng([seed, 1 << 30]))
    labels_csv = out / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for (rel, label), split in zip(rows, splits):
            writer.writerow([rel, label, split])
    return labels_csv


def ensure_synthetic_shards(
    out: str,
    *,
    seed: int = 0,
    endpoint_url: str = "",
    region: str = "",
    echo: Callable[[str], None] = print,
    n_clips: int = 128,
    seconds: float = 3.0,
    max_samples: int = 32,
) -> str:
    """The demo corpus (``data.shards: synthetic``) as WebDataset shards at ``out``; returns
    ``out`` as it is read (an s3:// URL as given, a local folder made absolute).

    ``n_clips`` clips of ``seconds`` from :func:`make_corpus` (``seed``), ``max_samples``
    per shard. Built once: :func:`cola_ray.data.shards.build_shards` returns at once when
    a complete build is at ``out`` and finishes a partial one (the clips are made again
    each call, in a temporary folder: a few seconds).
    """
    import os
    import tempfile

    from cola_ray.data import shards, storage

    if not storage.is_s3(out):
        out = os.path.abspath(out)
    with tempfile.TemporaryDirectory(prefix="cola-synth-") as tmp:
        labels = make_corpus(tmp, n_clips=n_clips, seconds=seconds, seed=seed)
        echo(f"Synthetic corpus: shards at {out}")
        shards.build_shards(tmp, out, labels_csv=labels, max_samples=max_samples, progress=False,
                            endpoint_url=endpoint_url, region=region)
    return out


def synth_clip(family: str, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of ``family``: (n,) float32, peak in [0.3, 0.9], with a coloured noise floor."""
    t = np.arange(n) / sample_rate
    x = FAMILIES[family](t, sample_rate, rng)
    x = x / (np.sqrt(np.mean(x**2)) + 1e-12)
    # A noise floor whose colour and level belong to the clip: one more clip-level cue.
    snr_db = rng.uniform(15.0, 35.0)
    floor = _coloured_noise(n, rng.uniform(0.0, 2.0), rng)
    x = x + floor * 10 ** (-snr_db / 20)
    x = x * (rng.uniform(0.3, 0.9) / (np.abs(x).max() + 1e-12))
    return x.astype(np.float32)


# ---- families: (t (n,), sample_rate, rng) -> (n,) float64 -------------------------------

def _harmonic_tone(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = _log_uniform(rng, 110.0, 880.0)
    n_harm = int(rng.integers(3, 9))
    k = np.arange(1, n_harm + 1)
    weights = rng.uniform(0.2, 1.0, n_harm) * k ** -rng.uniform(0.3, 2.0)
    vib = 1 + rng.uniform(0.0, 0.01) * np.sin(2 * np.pi * rng.uniform(3.0, 7.0) * t)
    phase = 2 * np.pi * f0 * np.cumsum(vib) / sr
    x = sum(w * np.sin(h * phase + rng.uniform(0, 2 * np.pi)) for h, w in zip(k, weights) if h * f0 < sr / 2 - 500)
    return x * _am(t, rng, rate=(0.5, 6.0), depth=(0.0, 0.6))


def _fm_chirps(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(0.15, 0.8)
    f_lo = _log_uniform(rng, 200.0, 1500.0)
    f_hi = min(f_lo * rng.uniform(1.5, 5.0), sr / 2 - 1000)
    pos = (t / period + rng.uniform()) % 1.0  # position inside the current sweep
    if rng.uniform() < 0.5:
        pos = 1.0 - pos  # downward sweeps
    freq = f_lo * (f_hi / f_lo) ** pos
    phase = 2 * np.pi * np.cumsum(freq) / sr
    second = rng.uniform(0.0, 0.5)
    env = np.sin(np.pi * pos) ** 0.5  # fade each sweep in and out: no clicks at the wrap
    return env * (np.sin(phase) + second * np.sin(2 * phase))


def _bandpass_noise(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = t.shape[0]
    fc = _log_uniform(rng, 300.0, 5000.0)
    bw = fc * rng.uniform(0.08, 0.5)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    spectrum = np.fft.rfft(rng.standard_normal(n)) * np.exp(-0.5 * ((freqs - fc) / bw) ** 2)
    return np.fft.irfft(spectrum, n) * _am(t, rng, rate=(0.5, 8.0), depth=(0.0, 0.8))


def _click_train(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = t.shape[0]
    rate = _log_uniform(rng, 3.0, 30.0)
    onsets = np.arange(rng.uniform(0, 1 / rate), t[-1], 1 / rate)
    onsets = onsets + rng.normal(0, rng.uniform(0.0, 0.1) / rate, onsets.shape)
    impulses = np.zeros(n)
    idx = np.clip((onsets * sr).astype(int), 0, n - 1)
    impulses[idx] = rng.uniform(0.6, 1.0, idx.shape)
    tau = rng.uniform(0.001, 0.01)
    kt = np.arange(int(5 * tau * sr)) / sr
    kernel = np.exp(-kt / tau) * np.sin(2 * np.pi * _log_uniform(rng, 500.0, 6000.0) * kt)
    return np.convolve(impulses, kernel)[:n]


def _tone_bursts(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    f = _log_uniform(rng, 300.0, 3000.0)
    ioi = rng.uniform(0.1, 0.5)  # inter-onset interval
    length = rng.uniform(0.03, min(0.15, 0.8 * ioi))
    pos = (t + rng.uniform(0, ioi)) % ioi
    gate = np.where(pos < length, np.sin(np.pi * pos / length) ** 2, 0.0)
    return gate * (np.sin(2 * np.pi * f * t) + rng.uniform(0.0, 0.6) * np.sin(4 * np.pi * f * t))


def _beating_tones(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    f = _log_uniform(rng, 150.0, 1200.0)
    beat = rng.uniform(1.0, 8.0)
    x = np.sin(2 * np.pi * f * t) + np.sin(2 * np.pi * (f + beat) * t + rng.uniform(0, 2 * np.pi))
    partial = rng.uniform(1.5, 3.5)
    return x + rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * f * partial * t)


FAMILIES: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "tones": _harmonic_tone,
    "chirps": _fm_chirps,
    "noise": _bandpass_noise,
    "clicks": _click_train,
    "bursts": _tone_bursts,
    "beats": _beating_tones,
}
"""Class name -> generator; ``make_corpus(n_classes=k)`` uses the first k."""


# ---- helpers ---------------------------------------------------------------------------

def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _am(t: np.ndarray, rng: np.random.Generator, rate: tuple[float, float], depth: tuple[float, float]) -> np.ndarray:
    """Amplitude modulation 1 - d/2 (1 - cos(2 pi r t)), rate and depth drawn per clip."""
    d = rng.uniform(*depth)
    return 1.0 - 0.5 * d * (1.0 - np.cos(2 * np.pi * rng.uniform(*rate) * t + rng.uniform(0, 2 * np.pi)))


def _coloured_noise(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) noise with power spectrum ~ 1 / f**alpha (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.shape[0], dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spectrum / f ** (alpha / 2), n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _stratified_splits(labels: list[str], rng: np.random.Generator) -> list[str]:
    """train / validation / test for each clip, about 70/15/15 within every class."""
    splits = ["train"] * len(labels)
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n = len(idx)
        n_val = max(1, round(0.15 * n)) if n >= 3 else 0
        n_test = max(1, round(0.15 * n)) if n >= 3 else 0
        for j in idx[n - n_val - n_test : n - n_test]:
            splits[j] = "validation"
        for j in idx[n - n_test :]:
            splits[j] = "test"
    return splits
