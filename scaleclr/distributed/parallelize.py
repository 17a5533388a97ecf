"""Distribution applied from outside the model: activation checkpointing and FSDP2 (``fully_shard``) wrapping.

The model (single-device code) only *names* its units: ``ResNet.shard_units()`` (residual blocks),
``ResNet.stages()`` (``layer1`` .. ``layer4``) and the heads of :class:`scaleclr.models.SimCLRModel`. This module
applies, in one fixed order (SyncBN conversion is done before, by the trainer; ``torch.compile`` of the blocks,
:mod:`scaleclr.distributed.compile`, between 1 and 2):

1. activation checkpointing, one region per residual block (:func:`apply_activation_checkpointing`, also used by
   the DDP and DeepSpeed engines);
2. ``fully_shard`` per unit (``block``: every residual block and every head; ``stage``: every ResNet stage and
   every head), BatchNorm parameters excluded (``ignored_params``: replicated in fp32, see :func:`parallelize`;
   pytorch#75478, torchtitan#674 on BN under FSDP mixed precision);
3. ``fully_shard`` on the root (the stem ``conv1`` and anything not yet sharded).

Activation checkpointing and BatchNorm: a checkpointed region runs its forward twice (once more during backward),
which would apply the running-statistics update twice. Each region therefore snapshots its BN buffers
(``running_mean``, ``running_var``, ``num_batches_tracked``) when the recomputation starts and restores them when
it ends, so training with checkpointing gives the same parameters *and* buffers as without it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

__all__ = ["SHARD_UNITS", "residual_blocks", "shard_units", "apply_activation_checkpointing", "build_mesh",
           "parallelize", "batchnorm_params", "is_activation_checkpointed"]

SHARD_UNITS = ("block", "stage")


def _trunk_and_heads(model: nn.Module):
    trunk = getattr(model, "trunk", model)
    heads = list(getattr(model, "heads", [])) if trunk is not model else []
    return trunk, heads


def residual_blocks(model: nn.Module) -> List[nn.Module]:
    """The residual blocks of a :class:`SimCLRModel` (or bare trunk), in forward order.

    Raises:
        ValueError: the trunk does not name its blocks (no ``shard_units()``).
    """
    trunk, _ = _trunk_and_heads(model)
    if not hasattr(trunk, "shard_units"):
        raise ValueError(f"{type(trunk).__name__} does not name its residual blocks (no shard_units()); "
                         "activation checkpointing and FSDP wrapping need them")
    return list(trunk.shard_units())


def shard_units(model: nn.Module, unit: str) -> List[nn.Module]:
    """The modules that get their own ``fully_shard``, for ``config.MODEL.FSDP_CONFIG.SHARD_UNIT``.

    Args:
        model: a :class:`SimCLRModel` (or a bare trunk).
        unit: ``"block"`` (every residual block, then every head) or ``"stage"`` (``layer1`` .. ``layer4``, then
            every head).

    Raises:
        ValueError: unknown unit, or a trunk that does not name its blocks/stages.
    """
    if unit not in SHARD_UNITS:
        raise ValueError(f"config.MODEL.FSDP_CONFIG.SHARD_UNIT={unit!r}; allowed: {', '.join(SHARD_UNITS)}")
    trunk, heads = _trunk_and_heads(model)
    if unit == "block":
        return residual_blocks(model) + heads
    if not hasattr(trunk, "stages"):
        raise ValueError(f"{type(trunk).__name__} does not name its stages (no stages()); use SHARD_UNIT=block")
    return list(trunk.stages()) + heads


class _RestoreBatchNormStats:
    """Context manager: snapshot the BN buffers of a region on enter, put them back on exit."""

    def __init__(self, bns: Sequence[_BatchNorm]):
        self.bns = bns
        self.saved: List[List[Optional[torch.Tensor]]] = []

    def __enter__(self):
        with torch.no_grad():
            self.saved = [[None if b is None else b.detach().clone() for b in
                           (bn.running_mean, bn.running_var, bn.num_batches_tracked)] for bn in self.bns]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for bn, saved in zip(self.bns, self.saved):
                for buf, old in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), saved):
                    if buf is not None and old is not None:
                        buf.copy_(old)
        self.saved = []
        return False


def _bn_context_fn(region: nn.Module):
    bns = [m for m in region.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]

    def context_fn():
        # (context for the original forward, context for the recomputation)
        return contextlib.nullcontext(), _RestoreBatchNormStats(bns)

    return context_fn


def is_activation_checkpointed(module: nn.Module) -> bool:
    return bool(getattr(module, "_scaleclr_activation_checkpointed", False))


def apply_activation_checkpointing(model: nn.Module, regions: Optional[Sequence[nn.Module]] = None) -> int:
    """Checkpoint the activations of every residual block (non-reentrant, composable: parameter names unchanged).

    Only the block's input is kept for backward; its inner activations are recomputed in backward. The BN running
    statistics are not updated a second time by the recomputation (see the module docstring), so values are
    unchanged. Works with DDP and with FSDP2 (apply it before ``fully_shard``); idempotent.

    Args:
        model: a :class:`SimCLRModel` or trunk (before wrapping).
        regions: the modules to checkpoint; default :func:`residual_blocks`.

    Returns:
        The number of checkpointed regions.
    """
    from torch.distributed._composable import checkpoint

    regions = residual_blocks(model) if regions is None else list(regions)
    n = 0
    for region in regions:
        if is_activation_checkpointed(region):
            continue
        checkpoint(region, context_fn=_bn_context_fn(region))
        region._scaleclr_activation_checkpointed = True
        n += 1
    return n


def build_mesh(device_type: str, world_size: int, replicate: int = 1):
    """The data-parallel device mesh: 1-D ``(shard,)``, or 2-D ``(replicate, shard)`` for HSDP.

    With ``replicate = R > 1`` ranks ``k*S .. (k+1)*S - 1`` (``S = world/R``, consecutive ranks, i.e. one node
    with the usual launch layout) shard the parameters among themselves and the R groups hold replicas.

    Raises:
        ValueError: ``world_size`` not divisible by ``replicate``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if replicate < 1 or world_size % replicate:
        raise ValueError(f"config.MODEL.FSDP_CONFIG.HSDP_REPLICATE={replicate} must be >= 1 and divide the world "
                         f"size {world_size}")
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def batchnorm_params(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of every BatchNorm (incl. SyncBN), in ``named_parameters`` order (the same on every rank:
    collectives over them must never iterate a set)."""
    owned = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
    return [p for _, p in model.named_parameters() if id(p) in owned]


def parallelize(model: nn.Module, mesh, *, shard_unit: str, reshard_after_forward: bool,
                param_dtype: Optional[torch.dtype]) -> List[nn.Parameter]:
    """Shard ``model`` with FSDP2 in place: every unit, then the root. Activation checkpointing and
    ``torch.compile`` are applied before, by the engine (``Engine.place``), in that order.

    BatchNorm parameters are not sharded: they stay plain fp32 tensors, replicated on every rank
    (``fully_shard(..., ignored_params=...)``), so BN keeps fp32 weights under any ``param_dtype`` and costs no
    collective of its own in forward; their gradients are local and the caller averages them over the data-
    parallel ranks with ONE all-reduce per step (``FSDPEngine.step``). Per step that leaves one all-gather (two
    with ``reshard_after_forward``) and one reduce-scatter per unit, instead of a unit per BatchNorm.

    Args:
        model: a :class:`SimCLRModel` on its device, SyncBN already converted.
        mesh: from :func:`build_mesh` (1-D: FSDP, 2-D: HSDP).
        shard_unit: ``"block"`` or ``"stage"`` (see :func:`shard_units`).
        reshard_after_forward: free the unsharded parameters after each unit's forward (all-gather again in
            backward; ZeRO-3-like) or keep them until backward (ZeRO-2-like, more memory, less communication).
        param_dtype: ``None`` (fp32) or ``torch.bfloat16`` / ``torch.float16``: convolution and linear
            parameters are all-gathered and used in this dtype, gradients are reduced in fp32, the sharded master
            parameters stay fp32. The forward then runs under ``torch.autocast(device, param_dtype)``
            (``FSDPEngine.autocast``), so BN sees low-precision activations with its fp32 weights and statistics:
            the BatchNorm policy of :mod:`scaleclr.engines.precision`, as in the DDP engine.

    Returns:
        The replicated BatchNorm parameters, in a rank-independent order (the caller reduces their gradients).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = shard_units(model, shard_unit)  # validates before anything is changed
    replicated = batchnorm_params(model)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=set(replicated))
    if param_dtype is not None and param_dtype != torch.float32:
        # module inputs are NOT cast: the forward runs under torch.autocast(param_dtype), which casts at each
        # conv/linear exactly like the DDP engine's AMP
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=mp, **kw)
    fully_shard(model, mp_policy=mp, **kw)
    logger.info("FSDP: %d units + root, parameters %s, %d BatchNorm parameters replicated in fp32", len(units),
                param_dtype or "fp32", len(replicated))
    return replicated
