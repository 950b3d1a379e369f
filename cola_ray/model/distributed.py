"""Collectives that degrade gracefully: single-process code paths need no process group.

As lightly's ``utils/dist.py``: without an initialised ``torch.distributed`` process group
``rank()`` is 0, ``world_size()`` is 1 and every collective returns its input, so the loss
and the model run unchanged in tests and notebooks. Ray Train initialises the process
group on its workers; nothing here imports Ray.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def is_distributed() -> bool:
    """True inside an initialised process group (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, ...) from every rank -> (world * B, ...), rank r's rows at ``[r*B:(r+1)*B]``.

    Autograd-aware (``torch.distributed.nn.functional.all_gather``): the backward sums, on
    every rank, the gradients that all ranks' losses sent to its rows, so a rank's
    positives are trained by every anchor that used them as negatives. Every rank must
    call this with the same B. Single process: returns ``x`` itself.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, ...) from every rank -> (world * B, ...) in rank order; no gradient (labels,
    ids, metrics). Every rank must call this with the same shape. Single process: ``x``."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce(x: torch.Tensor, op: str | dist.ReduceOp = "sum") -> torch.Tensor:
    """Reduce ``x`` over ranks in place and return it; a no-op single-process.

    ``op``: a ``ReduceOp`` or one of ``sum``, ``mean``, ``max``, ``min``, ``product``. ``mean``
    is a sum divided by the world size (gloo has no ``AVG``; floating tensors only). No gradient flows through
    this: it is for metrics and agreement between ranks (e.g. "is any loss non-finite?").
    """
    if world_size() == 1:
        return x
    if isinstance(op, str):
        if op == "mean":
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            return x.div_(world_size())
        if op not in _OPS:
            raise ValueError(f"unknown reduce op {op!r}; use one of mean, {', '.join(_OPS)}")
        op = _OPS[op]
    dist.all_reduce(x, op=op)
    return x
