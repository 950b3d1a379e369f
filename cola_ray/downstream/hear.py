"""The HEAR 2021 API over an exported encoder (``cola-ray export``).

    from cola_ray.downstream import hear
    model = hear.load_model("exports/cola-v3")             # folder or its config.json
    emb, ts = hear.get_timestamp_embeddings(audio, model)   # audio (n_sounds, n_samples), 16 kHz
    scene = hear.get_scene_embeddings(audio, model)         # (n_sounds, D)

or ``hear-validator cola_ray.downstream.hear -m exports/cola-v3``.

Timestamp embeddings: the encoder sees exactly what it was trained on, one 0.975 s
segment (15600 samples = 96 log-mel frames). Window ``k`` is CENTRED on sample
``k * hop`` (timestamp ``k * hop_ms``), ``k = 0 .. n_samples // hop``, so the first window
is centred on the first sample and the last one at or just before the end; audio beyond
the clip is zeros (as the HEAR baseline's ``frame_audio``). Clips shorter than a window
are therefore fine. The hop is 50 ms by default, the largest the HEAR validator accepts
without a warning (music transcription is scored with a 50 ms tolerance).

Scene embeddings: the mean of the clip's timestamp embeddings, edge windows included.
COLA is trained on single 1 s crops, so any fixed-length pooling of crop embeddings is a
choice; the mean over a dense grid is order-free, uses every part of the clip equally,
and equals what a downstream model gets by averaging the timestamp embeddings itself.
(The encoder already max-pools inside each window; a max over windows would let one
loud second decide the whole clip.)

Both run on the model's device, ``max_windows`` windows per encoder call (bounded
memory), and return tensors on the input's device. The model stays in eval mode: the
embedding of a sound never depends on the rest of the batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cola_ray.model.encoder import WaveformEncoder
from cola_ray.downstream.export import load_export

DEFAULT_HOP_MS = 50.0
DEFAULT_MAX_WINDOWS = 128


class HearModel(nn.Module):
    """An encoder plus the attributes HEAR asks for; what :func:`load_model` returns."""

    def __init__(self, encoder: WaveformEncoder, window_samples: int, *, hop_ms: float = DEFAULT_HOP_MS,
                 max_windows: int = DEFAULT_MAX_WINDOWS) -> None:
        super().__init__()
        self.encoder = encoder
        self.sample_rate = int(encoder.sample_rate)
        self.scene_embedding_size = int(encoder.embedding_dim)
        self.timestamp_embedding_size = int(encoder.embedding_dim)
        self.window_samples = int(window_samples)
        # Whole samples, so timestamps are exact multiples of the hop actually used.
        self.hop_samples = round(self.sample_rate * hop_ms / 1000.0)
        if self.hop_samples < 1 or not math.isfinite(hop_ms):
            raise ValueError(f"hop_ms={hop_ms} is less than one sample at {self.sample_rate} Hz")
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        self.max_windows = int(max_windows)
        self.eval()

    @property
    def hop_ms(self) -> float:
        return self.hop_samples * 1000.0 / self.sample_rate

    def train(self, mode: bool = True) -> "HearModel":
        # Inference only: batch norm in training mode would mix the sounds of a batch.
        return super().train(False)

    def forward(self, audio: Tensor) -> Tensor:
        """``audio`` (n_sounds, n_samples) -> timestamp embeddings (n_sounds, n_timestamps, D)."""
        return get_timestamp_embeddings(audio, self)[0]


def load_model(model_file_path: str = "", *, hop_ms: float = DEFAULT_HOP_MS,
               max_windows: int = DEFAULT_MAX_WINDOWS) -> HearModel:
    """An export folder (``cola-ray export --encoder REF OUT``) or its ``config.json`` -> HearModel.

    The model is on CPU; move it with ``.to(device)``.
    """
    if not model_file_path:
        raise ValueError(
            "cola_ray.downstream.hear.load_model needs the path of a cola-ray encoder export: the folder "
            "written by `cola-ray export --encoder REF OUT` (weights.safetensors + config.json) "
            "or its config.json, e.g. `hear-validator cola_ray.downstream.hear -m exports/cola-v3`"
        )
    encoder, config = load_export(Path(model_file_path))
    return HearModel(encoder, config["segment_samples"], hop_ms=hop_ms, max_windows=max_windows)


def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """``audio`` (n_sounds, n_samples) float at ``model.sample_rate`` ->
    ``(embeddings (n_sounds, n_timestamps, D) float32, timestamps (n_sounds, n_timestamps) ms)``.

    ``n_timestamps = 1 + n_samples // hop``; timestamp ``k`` is ``k * model.hop_ms`` and the
    window behind it is centred there (see the module docstring).
    """
    audio = _check_audio(audio)
    out_device = audio.device
    device = next(model.encoder.parameters()).device
    x = audio.to(device=device, dtype=torch.float32)
    n_sounds, n_samples = x.shape
    w, hop = model.window_samples, model.hop_samples
    n = 1 + n_samples // hop
    # Pad half a window each side: window k then starts at k * hop and is centred on
    # sample k * hop of the clip. unfold gives all windows as a view, (n_sounds, n, w).
    windows = F.pad(x, (w // 2, w - w // 2)).unfold(1, w, hop)[:, :n]
    flat = torch.empty(n_sounds * n, model.timestamp_embedding_size, device=device)
    model.eval()
    with torch.no_grad():
        for start in range(0, n_sounds * n, model.max_windows):
            idx = torch.arange(start, min(start + model.max_windows, n_sounds * n), device=device)
            batch = windows[idx // n, idx % n]  # (m, w): only this chunk is copied
            flat[start : start + len(idx)] = model.encoder(batch).float()
    embeddings = flat.view(n_sounds, n, -1)
    timestamps = (torch.arange(n, dtype=torch.float64) * (hop * 1000.0 / model.sample_rate)).float()
    timestamps = timestamps.expand(n_sounds, n).contiguous()
    return embeddings.to(out_device), timestamps.to(out_device)


def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """``audio`` (n_sounds, n_samples) -> (n_sounds, D) float32: mean of the timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return embeddings.mean(dim=1)


def _check_audio(audio: Tensor) -> Tensor:
    expected = "a torch float tensor of shape (n_sounds, n_samples) of finite samples at the model's sample rate"
    if not isinstance(audio, Tensor):
        raise ValueError(f"audio must be {expected}, got {type(audio).__name__}")
    if audio.dim() != 2:
        raise ValueError(f"audio must be {expected}, got shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise ValueError(f"audio must be {expected}, got dtype {audio.dtype}")
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"audio must be {expected} with n_sounds >= 1 and n_samples >= 1, got shape {tuple(audio.shape)}")
    if not bool(torch.isfinite(audio).all()):
        raise ValueError(f"audio must be {expected}; it holds NaN or infinite samples")
    return audio
