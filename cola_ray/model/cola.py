"""ColaModel: encoder f + projection g + similarity + loss in one ``nn.Module``.

Keeping the loss's parameters (the bilinear W) and the head inside the module that DDP
wraps is what keeps them synchronised across workers (as timm's and open_clip's task
modules). One training step is ``model(anchor, positive)["loss"].backward()``.
"""

from __future__ import annotations

import torch
from torch import nn

import math

from cola_ray.config import FeatureConfig, ModelConfig, bilinear_scale
from cola_ray.model.encoder import WaveformEncoder
from cola_ray.model.loss import cola_loss


class ColaModel(nn.Module):
    """COLA pre-training model over pairs of waveform crops.

    - ``encoder``: :class:`WaveformEncoder`, (B, S) -> h (B, D); kept after pre-training.
    - ``head`` (the paper's g): Linear(D, proj_dim) -> LayerNorm -> tanh for the bilinear
      similarity, a single Linear for cosine (as the authors' code); discarded after
      pre-training.
    - ``W``: (proj_dim, proj_dim) bilinear matrix (``model.bilinear_init``: N(0,
      bilinear_init_std) as the paper, identity or zeros); ``None`` for cosine.
    - ``logit_scale``: with ``model.bilinear_scale=learnable``, the log of the multiplier of
      the bilinear logits (as CLIP's), starting at log(1/sqrt(proj_dim)); otherwise ``None``
      and the multiplier is the fixed ``scale`` (1 for the paper).

    Why the options: with the paper's init the logits of random pairs have a standard
    deviation of about proj_dim * var(tanh) * 0.05 ~ 10 (512 features), unrelated to which
    candidate is the positive, so the first loss is ~25 nats instead of log(batch) and
    training waits until Adam has moved every entry of W by its own size.
    """

    def __init__(self, features: FeatureConfig, model: ModelConfig) -> None:
        super().__init__()
        if model.similarity not in ("bilinear", "cosine"):
            raise ValueError(f"model.similarity must be 'bilinear' or 'cosine', got {model.similarity!r}")
        self.similarity = model.similarity
        self.temperature = model.temperature
        self.gather_negatives = model.gather_negatives
        self.mask_same_clip = model.mask_same_clip
        self.encoder = WaveformEncoder(features, model)
        dim, proj = self.encoder.embedding_dim, model.proj_dim
        if self.similarity == "bilinear":
            self.head = nn.Sequential(nn.Linear(dim, proj), nn.LayerNorm(proj), nn.Tanh())
            if model.bilinear_init == "identity":
                w = torch.eye(proj)
            elif model.bilinear_init == "zeros":
                w = torch.zeros(proj, proj)
            else:
                w = torch.randn(proj, proj) * model.bilinear_init_std
            self.W = nn.Parameter(w)
            self.scale = bilinear_scale(model.bilinear_scale, proj)
            if self.scale is None:
                self.logit_scale = nn.Parameter(torch.tensor(math.log(proj ** -0.5)))
            else:
                self.register_parameter("logit_scale", None)
        else:
            self.head = nn.Linear(dim, proj)
            self.register_parameter("W", None)  # no unused parameter for DDP to wait on
            self.register_parameter("logit_scale", None)
            self.scale = 1.0

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor,
                clip_ids: torch.Tensor | None = None,
                spec_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """anchor, positive (B, S) waveforms -> ``{"loss": scalar, "accuracy": scalar}``.

        Anchors and positives go through ONE encoder pass on (2B, S), as the authors' code,
        so batch-norm statistics are taken over both crops of every pair. ``clip_ids`` (B,)
        with ``model.mask_same_clip``: candidates cut from an anchor's own clip are not its
        negatives (see :func:`cola_ray.model.loss.cola_loss`). ``spec_keep`` (2B, 1, n_mels, T):
        the log-mel masks of :class:`cola_ray.model.augment.Augment` (anchors then positives).
        """
        if anchor.shape != positive.shape:
            raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} differ")
        b = anchor.shape[0]
        z = self.head(self.encoder(torch.cat([anchor, positive], dim=0), spec_keep))  # (2B, proj_dim)
        loss, accuracy = cola_loss(
            z[:b],
            z[b:],
            similarity=self.similarity,
            W=self.W,
            scale=self.logit_scale.clamp(max=math.log(100.0)).exp() if self.logit_scale is not None else self.scale,
            temperature=self.temperature,
            gather=self.gather_negatives,
            clip_ids=clip_ids if self.mask_same_clip else None,
        )
        return {"loss": loss, "accuracy": accuracy}

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave`` (B, S) -> h (B, embedding_dim): the representation used downstream."""
        return self.encoder(wave)

    def similarity_parameters(self) -> list[nn.Parameter]:
        """W and the learned logit scale (``train.bilinear_lr`` applies to these)."""
        return [p for p in (self.W, self.logit_scale) if p is not None]
