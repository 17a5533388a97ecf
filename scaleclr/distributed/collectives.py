"""Small collectives shared by the trainer and the engines.

- :func:`collective_device`: where small tensors for a collective must live (the GPU under NCCL).
- :func:`all_reduce_sum`: sum a small tensor over ranks (a no-op in one process).
- :func:`broadcast_buffers`: rank 0's module buffers (BatchNorm running statistics) to every rank, one message
  per dtype; the only buffer broadcaster in scaleclr (DDP-engine saves, DeepSpeed's per-forward sync).
- :func:`ensure_process_group`: the private 1-rank group FSDP2 and DeepSpeed need in a single process.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["collective_device", "is_distributed", "all_reduce_sum", "broadcast_buffers", "ensure_process_group"]


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``, as a new tensor on ``x``'s device; ``x`` itself is untouched.

    Args:
        x: any small tensor (e.g. ``[k]`` statistics); moved to :func:`collective_device` for the collective.

    Returns:
        Same shape and dtype as ``x``. Without a process group (or one rank) a copy of ``x``.
    """
    if not is_distributed(group):
        return x.clone()
    dev = collective_device()
    buf = x.detach().to(dev, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(x.device)


def broadcast_buffers(module: nn.Module, group=None, src_group_rank: int = 0) -> None:
    """Copy the buffers of ``module`` on rank ``src_group_rank`` of ``group`` to every rank of ``group``.

    One broadcast per buffer dtype (buffers are flattened into one message), in place. Collective; a no-op
    without a process group or with one rank.
    """
    if not is_distributed(group):
        return
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for b in module.buffers():
        if b is not None and b.numel() > 0:
            by_dtype.setdefault(b.dtype, []).append(b)
    src = dist.get_global_rank(group, src_group_rank) if group is not None else src_group_rank
    with torch.no_grad():
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def ensure_process_group(device: torch.device) -> Optional[str]:
    """Start a private 1-rank process group (in-memory store, no ports) when none exists.

    FSDP2 and DeepSpeed need ``torch.distributed`` even in a single process. Returns the backend started, or
    None when a group already existed.
    """
    if dist.is_initialized():
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return backend
