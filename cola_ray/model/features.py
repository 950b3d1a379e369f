"""Log-mel frontend: 16 kHz waveforms -> log-compressed mel filterbanks, on the training device.

Faithful to the authors' TensorFlow code (``cola/data.py``, ``tf.signal.stft``)::

    frames   (B, T, 400)   25 ms windows every 10 ms, first frame at sample 0 (no centring)
    window   periodic Hann
    spectrum (B, T, 513)   |rfft(frame, n=1024)|: each 400-sample frame zero-padded to 1024
    mel      (B, T, 64)    HTK mel matrix, 60-7800 Hz, unnormalised triangles, DC bin zeroed
    log      (B, 1, 64, T) natural log of the mel energies clamped to [1e-5, 1e8]

so 15600 samples give T = 1 + (15600 - 400) // 160 = 96 frames. ``torch.stft`` would frame
with ``n_fft``-long windows (a 1024-sample frame per hop, hence fewer frames); framing
with ``unfold`` and zero-padding inside ``rfft`` is what the TF code does.

One known difference remains: ``tf.signal.linear_to_mel_weight_matrix`` draws its
triangles linearly in mel, ``torchaudio``'s ``melscale_fbanks`` linearly in Hz. The bin
edges and centres are the same; the weights inside a triangle differ slightly.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from cola_ray.config import FeatureConfig


class LogMel(nn.Module):
    """``(B, S)`` float waveforms -> ``(B, 1, n_mels, T)`` log-mel, ``T = 1 + (S - win) // hop``.

    Pure torch, no learnable parameters: the window and the mel matrix are non-persistent
    buffers, so they follow ``.to(device)`` but stay out of state dicts (a checkpoint holds
    only what was learned, and a changed ``FeatureConfig`` is never silently overridden).
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        if cfg.n_fft < cfg.win_length:
            raise ValueError(
                f"features.n_fft={cfg.n_fft} is shorter than features.win_length={cfg.win_length}"
            )
        if not 0 <= cfg.f_min < cfg.f_max <= cfg.sample_rate / 2:
            raise ValueError(
                f"features.f_min={cfg.f_min} and f_max={cfg.f_max} must satisfy "
                f"0 <= f_min < f_max <= sample_rate / 2 = {cfg.sample_rate / 2}"
            )
        if cfg.power <= 0:
            raise ValueError(f"features.power must be > 0, got {cfg.power}")
        if not 0 < cfg.log_floor < cfg.log_ceiling:
            raise ValueError(
                f"need 0 < features.log_floor < log_ceiling, got {cfg.log_floor}, {cfg.log_ceiling}"
            )
        self.cfg = cfg
        self.win_length = cfg.win_length
        self.hop_length = cfg.hop_length
        self.n_fft = cfg.n_fft
        self.power = cfg.power
        self.log_floor = cfg.log_floor
        self.log_ceiling = cfg.log_ceiling

        # Periodic Hann = tf.signal.hann_window(periodic=True), the default of tf.signal.stft.
        window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
        mel = torchaudio.functional.melscale_fbanks(  # (n_fft // 2 + 1, n_mels)
            n_freqs=cfg.n_fft // 2 + 1,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
            n_mels=cfg.n_mels,
            sample_rate=cfg.sample_rate,
            norm=None,
            mel_scale=cfg.mel_scale,
        )
        if cfg.zero_dc:
            # tf.signal.linear_to_mel_weight_matrix always drops the DC bin (bands_to_zero=1);
            # with f_min > 0 its weights are already 0, this keeps it so for f_min = 0 too.
            mel[0, :] = 0.0
        self.register_buffer("window", window.float(), persistent=False)  # (win_length,)
        self.register_buffer("mel_matrix", mel.float(), persistent=False)  # (n_freqs, n_mels)

    @property
    def n_mels(self) -> int:
        return self.mel_matrix.shape[1]

    def n_frames(self, n_samples: int) -> int:
        """Frames made of ``n_samples`` samples (no centring, no padding)."""
        return 1 + (n_samples - self.win_length) // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave`` (B, S) float -> (B, 1, n_mels, T) float32."""
        if wave.dim() != 2:
            raise ValueError(f"LogMel expects waveforms of shape (B, S), got {tuple(wave.shape)}")
        if wave.shape[-1] < self.win_length:
            raise ValueError(
                f"LogMel needs at least win_length={self.win_length} samples, got {wave.shape[-1]}"
            )
        # Features in fp32 even inside a bf16/fp16 autocast region: the log of small
        # magnitudes and the sums of the mel matrix lose too much in half precision, and the
        # cost is negligible next to the encoder.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            wave = wave.float()
            frames = wave.unfold(-1, self.win_length, self.hop_length)  # (B, T, win) view
            frames = frames * self.window.float()
            spec = torch.fft.rfft(frames, n=self.n_fft)  # (B, T, n_fft // 2 + 1), zero-padded
            if self.power == 1.0:
                mag = spec.abs()
            elif self.power == 2.0:
                mag = spec.real.square() + spec.imag.square()
            else:
                mag = spec.abs().pow(self.power)
            mel = mag @ self.mel_matrix.float()  # (B, T, n_mels)
            logmel = mel.clamp(self.log_floor, self.log_ceiling).log()
            return logmel.transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, n_mels, T)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"sample_rate={c.sample_rate}, win_length={c.win_length}, hop_length={c.hop_length}, "
            f"n_fft={c.n_fft}, n_mels={c.n_mels}, f_min={c.f_min}, f_max={c.f_max}, "
            f"mel_scale={c.mel_scale!r}, power={c.power}, log_floor={c.log_floor:g}"
        )

