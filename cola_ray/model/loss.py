"""COLA's contrastive loss over positives gathered from every worker; pure math.

Row i of the logits is anchor i scored against every positive of the global batch; its
label is its own positive, the others are its negatives (paper eq. 2, one-directional
as the authors' code). As open_clip's ``ClipLoss`` with ``local_loss=True,
gather_with_grad=True``: each worker computes only its own rows, ``(B, world * B)``
logits, never the ``(world * B)^2`` matrix, and its labels are offset by ``rank * B``.
The gathered positives carry gradient back to the worker that made them, so the mean of
the workers' losses (what DDP's gradient averaging optimises) is exactly the loss one
worker would compute on the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cola_ray.model import distributed


def bilinear_logits(za: torch.Tensor, zp: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``s(a, p) = g(a)^T W g(p)``: za (B, P), zp (N, P), W (P, P) -> (B, N)."""
    return (za @ W) @ zp.T


def cosine_logits(za: torch.Tensor, zp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarity / temperature: za (B, P), zp (N, P) -> (B, N)."""
    return F.normalize(za, dim=-1) @ F.normalize(zp, dim=-1).T / temperature


def cola_loss(
    za: torch.Tensor,
    zp: torch.Tensor,
    *,
    similarity: str,
    W: torch.Tensor | None = None,
    scale: torch.Tensor | float = 1.0,
    temperature: float = 0.2,
    gather: bool = True,
    clip_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each anchor against all positives -> ``(loss, accuracy)`` scalars.

    za, zp: (B, P) projections of this worker's anchors and their positives (row i of zp
    is the positive of row i of za). With ``gather`` and a process group, the positives of
    all workers are the candidates: logits (B, world * B), label of row i ``rank * B + i``.
    ``loss`` is the mean over this worker's rows; ``accuracy`` the fraction of rows whose
    top-1 is their positive (no gradient). Every worker must pass the same B.

    ``scale`` multiplies the bilinear logits (a float or a learned scalar tensor; 1 in the
    paper). ``clip_ids`` (B,) integers, the clip each pair was cut from: with ``pairs_per_clip > 1``
    two pairs of one clip can share a (global) batch, and the other pair's positive is then
    a crop of the anchor's own clip scored as a negative. Such candidates are masked out
    (logit -inf) for that anchor; its own positive never is. None: no masking (the paper).
    """
    if za.shape != zp.shape or za.dim() != 2:
        raise ValueError(f"za and zp must both be (B, P), got {tuple(za.shape)} and {tuple(zp.shape)}")
    # Scores and softmax in at least fp32 even under bf16 autocast: a bf16 logit has ~3
    # significant digits, too coarse for differences between many similar negatives. The
    # (B, world * B) matrix is tiny next to the encoder, so this costs nothing noticeable.
    dtype = torch.promote_types(za.dtype, torch.float32)
    with torch.autocast(device_type=za.device.type, enabled=False):
        za, zp = za.to(dtype), zp.to(dtype)
        if gather:
            candidates = distributed.all_gather_with_grad(zp)  # (world * B, P)
            offset = distributed.rank() * za.shape[0]
        else:
            candidates, offset = zp, 0
        if similarity == "bilinear":
            if W is None:
                raise ValueError("similarity='bilinear' needs the bilinear matrix W")
            logits = bilinear_logits(za, candidates, W.to(dtype))
            if not (isinstance(scale, float) and scale == 1.0):
                logits = logits * (scale.to(dtype) if torch.is_tensor(scale) else scale)
        elif similarity == "cosine":
            logits = cosine_logits(za, candidates, temperature)
        else:
            raise ValueError(f"similarity must be 'bilinear' or 'cosine', got {similarity!r}")
        labels = torch.arange(za.shape[0], device=za.device) + offset  # (B,)
        if clip_ids is not None:
            logits = mask_same_clip(logits, labels, clip_ids, gather)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).to(dtype).mean()
    return loss, accuracy


def mask_same_clip(logits: torch.Tensor, labels: torch.Tensor, clip_ids: torch.Tensor, gather: bool) -> torch.Tensor:
    """logits (B, N) with every candidate from the anchor's own clip, but its positive, at -inf.

    ``clip_ids`` (B,) of this worker's pairs; with ``gather`` the ids of all workers' pairs
    are gathered (no gradient: they are labels) in the same order as the candidates.
    """
    if clip_ids.shape != labels.shape:
        raise ValueError(f"clip_ids must be (B,) = {tuple(labels.shape)}, got {tuple(clip_ids.shape)}")
    ids = clip_ids.to(device=logits.device, dtype=torch.int64)
    candidate_ids = distributed.all_gather(ids) if gather else ids  # (N,)
    same = ids[:, None] == candidate_ids[None, :]  # (B, N)
    same[torch.arange(labels.shape[0], device=logits.device), labels] = False
    return logits.masked_fill(same, float("-inf"))
