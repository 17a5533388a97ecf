"""All-gather helpers for contrastive losses (VISSL ``GatherLayer`` semantics).

SimCLR (Chen et al. 2020, arXiv 2002.05709) contrasts every anchor against the embeddings of the whole
global batch, so each rank all-gathers the (normalised) embeddings of all ranks. For the gradient to be
right, the gathered copies must carry gradient back to their owners: :func:`gather_with_grad` sums the
gradient of every rank's gathered buffer (all-reduce SUM) and hands each rank its own slice. With each rank
returning the mean loss over its own anchors, DDP's gradient averaging then yields exactly the gradient of
the global mean loss (see ``scaleclr.losses`` for the full contract).

Works with any backend that implements all-gather and all-reduce (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["world_info", "gather_with_grad", "all_gather_no_grad", "all_gather_rows"]


def world_info(group: Optional[dist.ProcessGroup] = None) -> Tuple[int, int]:
    """This process's ``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised.

    Args:
        group: process group (``None``: the default group).

    Returns:
        ``(rank, world)`` as python ints.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


_CHECKED_SHAPES: set = set()


def _check_equal_rows(x: torch.Tensor, world: int, group) -> None:
    """Raise ``ValueError`` unless every rank passes the same shape (one tiny all-gather of the shape).

    Checked once per (group, shape, dtype): training steps repeat the same shapes, and the check's host read
    would otherwise stall every step. Equal per-rank batches (DROP_LAST) keep the shapes equal; should one
    rank's shape change while the others' do not, its check no longer pairs with their collectives and the
    backend reports the mismatch (gloo) or times out after DISTRIBUTED.TIMEOUT_SECONDS (NCCL).
    """
    key = (id(group), tuple(x.shape), x.dtype, x.device.type)
    if key in _CHECKED_SHAPES:
        return
    shape = torch.tensor([x.dim(), *x.shape, *([0] * (8 - x.dim()))], dtype=torch.int64, device=x.device)
    shapes = torch.empty(world, shape.numel(), dtype=torch.int64, device=x.device)
    _all_gather_flat(shapes, shape[None], group)
    if not bool((shapes == shape).all()):
        raise ValueError(
            "gather_with_grad needs the same tensor shape on every rank (equal per-rank batches, "
            f"DATA.TRAIN.DROP_LAST=True); got shapes {shapes[:, 1:].tolist()} (first column = ndim)")
    _CHECKED_SHAPES.add(key)


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """All-gather ``x`` (same shape on all ranks) into ``out`` of shape ``[world * x.shape[0], ...]`` (the losses'
    and SyncBN's one all-gather). torch >= 2.14 names it ``all_gather_single`` (``all_gather_into_tensor`` is a
    deprecated alias); looked up at call time so wrappers installed on torch.distributed (tests counting
    collectives) see it."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x.contiguous(), group=group)


def all_gather_rows(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """All-gather rows without autograd, rank-major: ``[world * n, ...]`` from ``[n, ...]`` on every rank.

    No shape check (internal use on shapes known to be equal). Returns ``x`` itself when not distributed.
    """
    _, world = world_info(group)
    if world == 1:
        return x
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x, group)
    return out


def all_gather_no_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """All-gather rows of every rank (rank-major concatenation), detached from autograd.

    Args:
        x: ``[n, ...]``, same shape on every rank (checked).
        group: process group (``None``: default group).

    Returns:
        ``[world * n, ...]``: rows of rank 0, then rank 1, ...; ``x.detach()`` when not distributed or world 1.
    """
    _, world = world_info(group)
    if world == 1:
        return x.detach()
    _check_equal_rows(x, world, group)
    return all_gather_rows(x.detach(), group)


class _GatherWithGrad(torch.autograd.Function):
    """forward: all-gather rows; backward: all-reduce (SUM) the gathered gradient, return own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        rank, world = world_info(group)
        _check_equal_rows(x, world, group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # all_reduce is in place; never modify autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_with_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """All-gather rows of every rank, keeping gradient to every rank's copy (VISSL ``GatherLayer``).

    Forward: rank-major concatenation ``[x_rank0; x_rank1; ...]``. Backward: the gradient of the whole
    gathered buffer is all-reduced with SUM across ranks and each rank keeps its own slice, so a row's
    owner receives the sum over ranks of every gradient that flowed through its gathered copies.

    Args:
        x: ``[n, ...]``, same shape on every rank (checked; raises ``ValueError`` otherwise).
        group: process group (``None``: default group).

    Returns:
        ``[world * n, ...]``; ``x`` unchanged when torch.distributed is not initialised or world is 1.
    """
    _, world = world_info(group)
    if world == 1:
        return x
    return _GatherWithGrad.apply(x, group)
