"""Augmentations of the training crops, drawn on the training device (``augment.*``).

COLA's only "augmentation" is the choice of two crops of a clip. At small data, contrastive
audio models also learn from crops perturbed in ways the representation should ignore
(BYOL-A, CLAR, SpecAugment): loudness, a second source or noise underneath, a shift in time,
a missing band of frequencies or frames. Every option is off by default (the paper)::

    aug = Augment(cfg.augment, cfg.features)
    gen = aug.generator(seed, rank, step, device)           # the same draws on a resume
    anchor, positive = aug.waves(anchor, positive, gen)     # (B, S) each
    keep = aug.spec_keep(2 * B, n_frames, gen, device)      # (2B, 1, n_mels, T) or None
    model(anchor, positive, clip_ids, spec_keep=keep)

Waveform perturbations act on the crops before the model (no graph to keep); the masks are
applied inside the model, on the log-mel (:meth:`cola_ray.model.encoder.WaveformEncoder.forward`).
Nothing here imports Ray.
"""

from __future__ import annotations

import zlib

import torch

from cola_ray.config import AugmentConfig, FeatureConfig


class Augment:
    """The configured perturbations; :attr:`active` is False when all are off."""

    def __init__(self, cfg: AugmentConfig, features: FeatureConfig) -> None:
        self.cfg = cfg
        self.n_mels = features.n_mels
        self.active = cfg.active
        self.masks = bool(cfg.freq_mask or cfg.time_mask)

    @staticmethod
    def generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
        """A generator for one step of one rank: a function of (seed, rank, step) only, so a
        resumed run draws what the uninterrupted one would have, and ranks draw differently."""
        g = torch.Generator(device=device)
        g.manual_seed(zlib.crc32(f"{seed}/{rank}/{step}".encode()))
        return g

    def waves(self, anchor: torch.Tensor, positive: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Perturb each crop independently: anchor, positive (B, S) -> the same shapes."""
        if not (self.cfg.gain_db or self.cfg.mix_prob or self.cfg.noise_prob or self.cfg.time_shift):
            return anchor, positive
        b = anchor.shape[0]
        both = self._perturb(torch.cat([anchor, positive], dim=0), gen)
        return both[:b], both[b:]

    def _perturb(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x (N, S) crops -> perturbed (N, S); N = 2B, anchors then positives."""
        c, (n, s) = self.cfg, x.shape
        dev = x.device

        def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(*shape, generator=gen, device=dev)

        if c.time_shift:
            # Circular shift per crop: a gather with per-row offsets.
            shifts = (uniform(-c.time_shift, c.time_shift, n) * s).long()
            idx = (torch.arange(s, device=dev)[None, :] - shifts[:, None]) % s
            x = torch.gather(x, 1, idx)
        energy = x.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-10)  # (N, 1)
        if c.mix_prob:
            # Another clip's crop: the crop half a batch away among the anchors (and among the
            # positives), never the crop's own pair partner.
            b = n // 2
            other = torch.cat([x[:b].roll(max(1, b // 2), 0), x[b:].roll(max(1, b // 2), 0)], dim=0)
            other_energy = other.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-10)
            snr = uniform(c.mix_min_snr_db, c.mix_max_snr_db, n, 1)
            weight = torch.sqrt(energy / other_energy * 10.0 ** (-snr / 10.0))
            on = (torch.rand(n, 1, generator=gen, device=dev) < c.mix_prob).to(x.dtype)
            x = x + on * weight * other
        if c.noise_prob:
            snr = uniform(c.noise_min_snr_db, c.noise_max_snr_db, n, 1)
            noise = torch.randn(n, s, generator=gen, device=dev) * torch.sqrt(energy * 10.0 ** (-snr / 10.0))
            on = (torch.rand(n, 1, generator=gen, device=dev) < c.noise_prob).to(x.dtype)
            x = x + on * noise
        if c.gain_db:
            x = x * 10.0 ** (uniform(-c.gain_db, c.gain_db, n, 1) / 20.0)
        return x

    def spec_keep(self, n: int, frames: int, gen: torch.Generator,
                  device: torch.device) -> torch.Tensor | None:
        """(n, 1, n_mels, frames) float mask, 0 in one frequency band of up to
        ``augment.freq_mask`` bins and one time band of up to ``augment.time_mask`` frames per
        crop, 1 elsewhere; ``None`` when masking is off."""
        if not self.masks:
            return None
        keep = torch.ones(n, 1, self.n_mels, frames, device=device)
        for size, length, dim in ((self.cfg.freq_mask, self.n_mels, 2), (self.cfg.time_mask, frames, 3)):
            if not size:
                continue
            width = torch.randint(0, size + 1, (n,), generator=gen, device=device)
            start = (torch.rand(n, generator=gen, device=device) * (length - width + 1)).long()
            pos = torch.arange(length, device=device)[None, :]
            band = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # (n, length)
            shape = (n, 1, length, 1) if dim == 2 else (n, 1, 1, length)
            keep = keep * (~band).to(keep.dtype).view(shape)
        return keep
