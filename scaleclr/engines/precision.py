"""Mixed precision shared by every engine: autocast, and the one BatchNorm policy.

BatchNorm policy (what native ``torch.autocast`` does on CUDA and CPU): BatchNorm (and SyncBN) keeps fp32
weights, fp32 running statistics and fp32 accumulation of its batch statistics, while its input and output
activations stay in the autocast dtype, so BN and the ReLU after it store bf16/fp16 activations. DDP and FSDP
keep BN parameters in fp32 already; DeepSpeed's bf16/fp16 modes store every parameter (and buffer) in low
precision, so :func:`batchnorm_fp32` casts BN buffers back to fp32 and gives BN layers fp32 copies of their
low-precision parameters for the duration of each call (a differentiable cast: gradients reach the stored
parameters). The input is never cast.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

__all__ = ["autocast", "batchnorm_fp32", "is_batchnorm"]


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast(device.type, dtype)``, or a null context for fp32 (``dtype`` None)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _fp32_params_pre_hook(module, args):
    stash = {}
    for name in ("weight", "bias"):
        p = module._parameters.get(name)
        if p is not None and p.dtype != torch.float32:
            stash[name] = p
            module._parameters[name] = p.float()
    module._scaleclr_bn_stash = stash


def _fp32_params_post_hook(module, args, output):
    for name, p in getattr(module, "_scaleclr_bn_stash", {}).items():
        module._parameters[name] = p
    module._scaleclr_bn_stash = {}
    return output


def batchnorm_fp32(model: nn.Module) -> int:
    """Apply the BatchNorm policy of the module docstring to every BN layer of ``model``.

    Call it after the engine has put the parameters in their final dtype (DeepSpeed: after
    ``deepspeed.initialize``, so ZeRO-3's gather hook runs before the cast; the restoring post-hook is
    prepended so parameters are put back before ZeRO-3 releases them). Idempotent.

    Returns:
        The number of BN layers whose parameters are stored in low precision (they get the cast hooks).
    """
    n = 0
    for m in model.modules():
        if not is_batchnorm(m):
            continue
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                setattr(m, name, b.float())
        low = any(p.dtype != torch.float32 for p in m.parameters(recurse=False))
        if low and not getattr(m, "_scaleclr_bn_fp32", False):
            m.register_forward_pre_hook(_fp32_params_pre_hook)
            m.register_forward_hook(_fp32_params_post_hook, prepend=True)
            m._scaleclr_bn_fp32 = True
        n += int(low)
    return n
