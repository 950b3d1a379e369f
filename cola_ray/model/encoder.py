"""Encoder f: waveform -> log-mel -> timm backbone -> embedding h.

Any timm model name works as the backbone (one interface for all, as timm's
``create_model``): built with ``in_chans=1`` (a log-mel is a one-channel image), no
classifier (``num_classes=0``) and the configured global pooling (max, as the paper), and
never with pretrained weights. :class:`WaveformEncoder` is what is kept after
pre-training: it maps 16 kHz waveforms ``(B, S)`` to embeddings ``(B, D)``.
"""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from cola_ray.config import FeatureConfig, ModelConfig
from cola_ray.model.features import LogMel

log = logging.getLogger(__name__)


def create_backbone(model_cfg: ModelConfig) -> nn.Module:
    """``timm.create_model(model_cfg.encoder)``: ``(B, 1, n_mels, T)`` -> ``(B, D)``.

    Stochastic depth (``drop_path_rate``) is passed only when it is non-zero; a model whose
    constructor does not take it is built without it, with a warning. An unknown name is a
    ``ValueError`` that names it.
    """
    name = model_cfg.encoder
    if not timm.is_model(name):
        raise ValueError(
            f"model.encoder={name!r} is not a timm model; see timm.list_models(), "
            "e.g. 'efficientnet_b0' (the paper) or 'test_efficientnet' (tiny, for tests)"
        )
    kwargs = dict(pretrained=False, in_chans=1, num_classes=0, global_pool=model_cfg.global_pool)
    if model_cfg.drop_path_rate > 0:
        try:
            return timm.create_model(name, drop_path_rate=model_cfg.drop_path_rate, **kwargs)
        except TypeError as e:
            # timm passes extra kwargs to the model class; families without stochastic depth
            # (VGG, DenseNet, DLA, ...) reject it. Anything else is a real error.
            if "drop_path_rate" not in str(e):
                raise
            log.warning(
                "timm model %r does not take drop_path_rate; building it without stochastic "
                "depth (model.drop_path_rate=%s ignored)", name, model_cfg.drop_path_rate,
            )
    return timm.create_model(name, **kwargs)


class WaveformEncoder(nn.Module):
    """f: 16 kHz waveforms ``(B, S)`` -> embeddings ``h`` ``(B, embedding_dim)``.

    ``embedding_dim`` is 1280 for ``efficientnet_b0`` with max pooling (the paper's h).
    On CUDA with ``model.channels_last`` the log-mel is handed to the backbone in
    channels_last layout; for the convolutions to actually run channels_last the
    backbone's weights must be converted too (``module.to(memory_format=torch.channels_last)``
    once, before DDP wrapping), as timm's train script does.
    """

    def __init__(self, features: FeatureConfig, model: ModelConfig) -> None:
        super().__init__()
        self.sample_rate = features.sample_rate
        self.channels_last = model.channels_last
        self.frontend = LogMel(features)
        # features.normalize=running: per mel bin, batch norm's running mean and variance (no
        # affine: the backbone's first layer scales); absent for "none", so old checkpoints load.
        self.norm = nn.BatchNorm1d(features.n_mels, affine=False) if features.normalize == "running" else None
        self.backbone = create_backbone(model)
        self.embedding_dim = self._probe_embedding_dim(features, model.encoder)

    @torch.no_grad()
    def _probe_embedding_dim(self, features: FeatureConfig, name: str) -> int:
        # One tiny forward is the only dependable width: timm's ``num_features`` does not
        # count a pooling that concatenates (``catavgmax``) or a pre-logits layer, and a
        # backbone that cannot take an (n_mels x T) input fails here, not mid-training.
        frames = self.frontend.n_frames(features.sample_rate)  # one second of audio
        was_training = self.backbone.training
        self.backbone.eval()  # eval: no batch statistics to touch, batch of one is fine
        try:
            out = self.backbone(torch.zeros(1, 1, features.n_mels, frames))
        except Exception as e:
            raise ValueError(
                f"timm model {name!r} cannot encode a "
                f"(1, {features.n_mels}, {frames}) log-mel: {e}"
            ) from e
        finally:
            self.backbone.train(was_training)
        if out.dim() != 2:
            raise ValueError(
                f"timm model {name!r} returned shape {tuple(out.shape)}, not (B, D); "
                "set model.global_pool to a pooling (e.g. 'max')"
            )
        return int(out.shape[1])

    def forward(self, wave: torch.Tensor, spec_keep: torch.Tensor | None = None) -> torch.Tensor:
        """``wave`` (B, S) float -> ``h`` (B, embedding_dim).

        ``spec_keep`` (B, 1, n_mels, T), training only: a 0/1 mask of the (normalised) log-mel;
        masked cells take the crop's mean value (:meth:`cola_ray.model.augment.Augment.spec_keep`).
        """
        x = self.frontend(wave)  # (B, 1, n_mels, T), fp32
        if self.norm is not None:
            x = self.norm(x.squeeze(1)).unsqueeze(1)
        if spec_keep is not None:
            mean = x.mean(dim=(2, 3), keepdim=True)
            x = x * spec_keep + mean * (1.0 - spec_keep)
        if self.channels_last and x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)


LOGMEL = "logmel"
"""The encoder name of the hand-made baseline, :class:`LogMelStats`."""


class LogMelStats(nn.Module):
    """The hand-made baseline as an encoder: ``(B, S)`` -> ``(B, 2 * n_mels)``, the mean and
    the standard deviation over frames of each log-mel band (mean first), with the same
    frontend pre-training uses. Nothing is learned; every table can show what learning adds
    over these features."""

    def __init__(self, features: FeatureConfig) -> None:
        super().__init__()
        self.sample_rate = features.sample_rate
        self.frontend = LogMel(features)
        self.embedding_dim = 2 * features.n_mels

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave`` (B, S) float -> (B, 2 * n_mels)."""
        x = self.frontend(wave).squeeze(1)  # (B, n_mels, T)
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=False)], dim=1)
