"""Synchronised batch normalisation (SyncBN) and VISSL-style SyncBN process groups.

SimCLR (Chen et al. 2020, arXiv 2002.05709, sec. 2.2 "Global BN") aggregates the BN mean and variance over
all devices, because per-device statistics let the network "cheat" the contrastive task. VISSL syncs within
groups of ranks (``MODEL.SYNC_BN_CONFIG.GROUP_SIZE``, default one machine). This module provides:

* :class:`SyncBatchNorm` -- scaleclr's own SyncBN. It works on CPU/gloo and CUDA/NCCL (``torch.nn.SyncBatchNorm``
  raises on CPU tensors, apex is CUDA-only and not on PyPI).
* :func:`create_sync_bn_process_group` -- VISSL ``GROUP_SIZE`` semantics (-1, 0, k > 0).
* :func:`convert_sync_batchnorm` -- replace every ``_BatchNorm`` with the chosen SyncBN
  (``SYNC_BN_TYPE`` ``native`` | ``pytorch`` | ``apex``), keeping parameters, buffers and state-dict keys.
* :func:`describe_sync_bn` -- one log line saying which SyncBN is in effect and over how many ranks.

Statistics algorithm (training mode, group of W ranks, C channels):
    Each rank computes, in fp32 (fp64 for fp64 input), its local element count n_r, per-channel mean m_r and
    centred sum of squares M2_r = sum (x - m_r)^2 (``torch.var_mean``, numerically stable). ONE ``all_gather``
    of the packed vector [n_r, m_r (C), M2_r (C)] (2C + 2 floats per rank; n_r split into two exact fp32 halves)
    gives every rank all W triples, which are merged with the parallel-variance formula of Chan et al.:
        N = sum n_r,  mean = sum (n_r / N) m_r,  M2 = sum M2_r + sum n_r (m_r - mean)^2.
    Every term of M2 is non-negative, so there is no catastrophic cancellation (unlike sum/sum-of-squares), and
    ranks with different local batch sizes (even 0) are weighted exactly. All ranks merge identical inputs in the
    same order, so mean, variance and the running statistics are bitwise identical on every rank of a group.
    This is the same communication pattern as apex's and torch's SyncBN (all-gather + Welford merge); the
    message is W x (2C + 2) floats, which for BN-sized vectors is latency-bound, not bandwidth-bound.
    The backward pass does ONE ``all_reduce`` of [sum(dy), sum(dy * xhat)] (2C floats) over the group.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from scaleclr.distributed.gather import all_gather_rows, world_info

logger = logging.getLogger(__name__)

__all__ = [
    "SyncBatchNorm",
    "ApexNotAvailableError",
    "SYNC_BN_TYPES",
    "create_sync_bn_process_group",
    "convert_sync_batchnorm",
    "describe_sync_bn",
    "is_apex_available",
]

SYNC_BN_TYPES = ("native", "pytorch", "apex")
_COUNT_SPLIT = float(2**24)  # fp32 represents integers < 2^24 exactly; counts are sent as lo + hi * 2^24


class ApexNotAvailableError(ImportError, ValueError):
    """``SYNC_BN_TYPE=apex`` was requested but NVIDIA apex cannot be imported (an ImportError and a ValueError)."""


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _reduce_dims(x: torch.Tensor) -> list[int]:
    """All dims except the channel dim 1: (N, C, *) -> [0, 2, 3, ...]."""
    return [0] + list(range(2, x.dim()))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 input, fp32 otherwise (bf16/fp16 input is accumulated in fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _group_batch_stats(x: torch.Tensor, process_group, group_size: int):
    """Per-channel statistics of the concatenation of all ranks' batches in ``process_group``.

    Args:
        x: local input, shape (N_r, C, *) with N_r possibly different on each rank (0 allowed).
        process_group: group to reduce over (None = world).
        group_size: number of ranks in the group.

    Returns:
        (mean, m2, count): mean and centred sum of squares of shape (C,), and the total element count per
        channel over the group (0-d tensor, sum_r N_r * prod(spatial)), all in the accumulation dtype and on
        x's device (no host synchronisation on accelerators).
    """
    acc = _acc_dtype(x)
    channels = x.shape[1]
    n_local = x.numel() // channels
    packed = torch.zeros(2 * channels + 2, dtype=acc, device=x.device)
    packed[0] = float(n_local % int(_COUNT_SPLIT))
    packed[1] = float(n_local // int(_COUNT_SPLIT))
    if n_local > 0:
        xa = x if x.dtype == acc else x.to(acc)
        var, mean = torch.var_mean(xa, dim=_reduce_dims(x), correction=0)
        packed[2:2 + channels] = mean
        packed[2 + channels:] = var * n_local
    gathered = all_gather_rows(packed, process_group).view(group_size, packed.numel())  # flat: gloo's "cat" form

    counts64 = gathered[:, 0].double() + gathered[:, 1].double() * _COUNT_SPLIT  # (W,), exact integers
    total64 = counts64.sum()
    # A group batch of one value per channel has no variance (NaN running variance): stop with a clear
    # message. An asynchronous device assert: no host read (on CUDA it fires when the kernel runs).
    torch._assert_async(total64 > 1, f"Expected more than 1 value per channel when training, summed over the "
                        f"{group_size} ranks of the SyncBN group (local input shape {tuple(x.shape)})")
    means = gathered[:, 2:2 + channels]  # (W, C)
    m2s = gathered[:, 2 + channels:]  # (W, C)
    weights = (counts64 / total64).to(acc).unsqueeze(1)  # (W, 1)
    mean = (weights * means).sum(0)
    m2 = m2s.sum(0) + (counts64.to(acc).unsqueeze(1) * (means - mean) ** 2).sum(0)
    total = total64.to(acc)
    return mean, m2, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with group statistics; backward all-reduces over the group.

    forward(x (N, C, *), weight (C,) | None, bias (C,) | None, mean (C,), var (C,), eps, count, group) -> y (N, C, *)
    ``mean``/``var`` are the group mean and biased variance (accumulation dtype, no gradient), invstd =
    1 / sqrt(var + eps), and ``count`` is the total number of elements per channel over the group.

    Backward (xhat = (x - mean) * invstd, sums over the whole group batch):
        dx = weight * invstd * (dy - sum(dy) / count - xhat * sum(dy * xhat) / count)
        dweight = sum_local(dy * xhat), dbias = sum_local(dy)
    The parameter gradients are this rank's share; DDP's gradient all-reduce adds the shares of all ranks.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, count, process_group):
        acc = mean.dtype
        shape = [1, -1] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps)
        if x.dtype == acc and all(t is None or t.dtype == acc for t in (weight, bias)):
            # One fused native kernel: eval-mode BN with the group statistics in place of the running stats.
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        else:  # reduced-precision input (or parameters): normalise in the accumulation dtype
            scale = invstd if weight is None else invstd * weight.to(acc)
            y = (x.to(acc) - mean.view(shape)) * scale.view(shape)
            if bias is not None:
                y = y + bias.to(acc).view(shape)
            y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = count
        ctx.process_group = process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = _reduce_dims(x)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]

        dy = grad_out if grad_out.dtype == acc else grad_out.to(acc)
        xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_w = sum_dy_xhat.to(weight.dtype) if (weight is not None and need_w) else None
        grad_b = sum_dy.to(ctx.bias_dtype) if (ctx.bias_dtype is not None and need_b) else None

        grad_x = None
        if need_x:
            buf = torch.cat([sum_dy, sum_dy_xhat])  # (2C,) acc dtype (never bf16/fp16 on the wire)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=ctx.process_group)
            channels = mean.numel()
            mean_dy = (buf[:channels] / ctx.count).view(shape)
            mean_dy_xhat = (buf[channels:] / ctx.count).view(shape)
            scale = invstd if weight is None else invstd * weight.to(acc)
            grad_x = ((dy - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """scaleclr's SyncBN (logged as ``scaleclr.SyncBatchNorm``): batch statistics over a group of ranks.

    Drop-in for ``nn.BatchNorm{1,2,3}d`` (same parameters, buffers and state-dict keys). Works on CPU/gloo and
    CUDA/NCCL. In training mode the batch mean and biased variance are those of the concatenation of all local
    batches in ``process_group`` (see the module docstring for the algorithm), which is what SimCLR
    (arXiv 2002.05709, sec. 2.2) calls global BN. The running statistics are updated exactly as
    ``torch.nn.BatchNorm`` would on that concatenated batch (unbiased variance, ``momentum`` or the cumulative
    average when ``momentum=None``, ``num_batches_tracked``), so they are identical on every rank of a group.
    Eval mode, an uninitialised ``torch.distributed`` or a group of one rank use plain ``F.batch_norm``.

    Shapes: input (N, C) or (N, C, *) (e.g. (N, C, H, W)); output has the input's shape, dtype and layout. The
    local N may differ between ranks (including 0 on some ranks). Reduced-precision input is accumulated and
    communicated in fp32.

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: running-stat factor, or None for a cumulative moving average.
        affine: learnable per-channel weight (and bias, unless ``bias=False``).
        track_running_stats: keep running mean/var buffers.
        process_group: ranks to synchronise over; None = the whole world.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels in dim 1, got input of shape "
                             f"{tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (N, C, *) with group statistics in training mode; see the class docstring."""
        self._check_input_dim(input)
        group_size = world_info(self.process_group)[1] if self.training else 1
        if group_size == 1:
            # Same as torch BatchNorm: eval mode with running stats, local batch stats otherwise.
            return super().forward(input)

        with torch.no_grad():
            mean, m2, count = _group_batch_stats(input, self.process_group, group_size)
            var = m2 / count  # biased: used for normalisation, as torch BatchNorm does
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked.item())
                else:
                    factor = float(self.momentum)
                unbiased_var = m2 / (count - 1)
                self.running_mean.copy_(
                    (factor * mean + (1.0 - factor) * self.running_mean.to(mean.dtype)).to(self.running_mean.dtype))
                self.running_var.copy_(
                    (factor * unbiased_var + (1.0 - factor) * self.running_var.to(mean.dtype))
                    .to(self.running_var.dtype))
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, var, self.eps, count,
                                           self.process_group)

    def extra_repr(self) -> str:
        try:
            group = f", group_size={world_info(self.process_group)[1]}"
        except (RuntimeError, ValueError):  # e.g. the process group was destroyed
            group = ""
        return super().extra_repr() + group


# --------------------------------------------------------------------------------------------------------------
# Process groups (VISSL MODEL.SYNC_BN_CONFIG.GROUP_SIZE)
# --------------------------------------------------------------------------------------------------------------

def create_sync_bn_process_group(group_size: int, num_proc_per_node: int | None = None):
    """Create the SyncBN process groups with VISSL semantics and return the one that contains this rank.

    ``group_size`` (``MODEL.SYNC_BN_CONFIG.GROUP_SIZE``):
        * -1: ``num_proc_per_node`` (``DISTRIBUTED.NUM_PROC_PER_NODE``): sync within a machine (VISSL default);
        * 0: no subgroup -> None, statistics over the whole world;
        * k > 0: min(k, world) contiguous ranks per group, [g*k, (g+1)*k); the world must be divisible by it.

    Collective: every rank must call this with the same arguments, in the same order relative to other
    ``new_group`` calls, because ``dist.new_group`` is collective; all world/k groups are created on every rank.

    Args:
        group_size: -1, 0 or a positive group size.
        num_proc_per_node: ranks per machine (the local world size); required for ``group_size=-1``.

    Returns:
        The ``ProcessGroup`` containing this rank, or None when the group is the whole world (also when
        torch.distributed is not initialised).

    Raises:
        ValueError: invalid ``group_size``, or a group size that does not divide the world size.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < -1:
        raise ValueError(f"MODEL.SYNC_BN_CONFIG.GROUP_SIZE={group_size!r} is invalid; allowed: -1 "
                         "(= DISTRIBUTED.NUM_PROC_PER_NODE, sync within a machine), 0 (whole world) or a positive "
                         "integer that divides the world size")
    if not _dist_ready() or group_size == 0:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if group_size == -1:
        if num_proc_per_node is None or num_proc_per_node < 1:
            raise ValueError("MODEL.SYNC_BN_CONFIG.GROUP_SIZE=-1 means DISTRIBUTED.NUM_PROC_PER_NODE ranks per "
                             f"group; pass num_proc_per_node (got {num_proc_per_node!r})")
        effective = num_proc_per_node
    else:
        effective = group_size
    if effective > world:
        logger.info("SyncBN GROUP_SIZE=%d exceeds the world size %d; using the whole world", effective, world)
        effective = world
    if world % effective != 0:
        divisors = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise ValueError(
            f"MODEL.SYNC_BN_CONFIG.GROUP_SIZE={group_size} (group size {effective}) does not divide the world "
            f"size {world} (NUM_NODES x NUM_PROC_PER_NODE); allowed: -1 (= NUM_PROC_PER_NODE"
            f"{'' if num_proc_per_node is None else '=' + str(num_proc_per_node)}), 0 (whole world), or a "
            f"divisor of {world}: {divisors}")
    if effective == world:
        return None
    groups = [dist.new_group(list(range(g * effective, (g + 1) * effective))) for g in range(world // effective)]
    return groups[rank // effective]


# --------------------------------------------------------------------------------------------------------------
# Conversion (MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE)
# --------------------------------------------------------------------------------------------------------------

def is_apex_available() -> bool:
    """Whether ``apex.parallel.SyncBatchNorm`` can be imported (imports apex lazily; for config preflight)."""
    try:
        _import_apex_sync_bn()
    except ApexNotAvailableError:
        return False
    return True


def _import_apex_sync_bn():
    """The only apex import in scaleclr (lazy)."""
    try:
        from apex.parallel import SyncBatchNorm as ApexSyncBatchNorm  # noqa: PLC0415
    except ImportError as e:
        raise ApexNotAvailableError(
            "MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex, but NVIDIA apex is not installed (import failed: "
            f"{e}). apex is not on PyPI (it must be built from source against your CUDA/torch). Use "
            "SYNC_BN_TYPE=pytorch (torch.nn.SyncBatchNorm on CUDA) or SYNC_BN_TYPE=native (scaleclr's own, "
            "CPU and CUDA); both compute the same group statistics.") from e
    return ApexSyncBatchNorm


def _module_device_types(module: nn.Module) -> set[str]:
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


def _pytorch_sync_bn_usable(module: nn.Module, process_group, device) -> tuple[bool, str]:
    """Whether torch.nn.SyncBatchNorm can run this model; returns (usable, description of the target)."""
    if device is not None:
        dev = torch.device(device).type
        return dev != "cpu", f"device {dev}"
    types = _module_device_types(module) - {"meta"}
    if types - {"cpu"}:
        return True, f"device {','.join(sorted(types))}"
    backend = dist.get_backend(process_group) if _dist_ready() else "none (not distributed)"
    on_cuda = torch.cuda.is_available() and "nccl" in str(backend)
    return on_cuda, f"device cpu, backend {backend}"


def _bn_factory(sync_bn_type: str, module: nn.Module, process_group, device) -> Callable[[_BatchNorm], nn.Module]:
    if sync_bn_type == "apex":
        apex_cls = _import_apex_sync_bn()

        def make_apex(bn: _BatchNorm) -> nn.Module:
            if bn.affine and bn.bias is None:
                raise ValueError(f"apex SyncBatchNorm has no bias=False variant ({bn})")
            return apex_cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                            track_running_stats=bn.track_running_stats, process_group=process_group)
        return make_apex

    if sync_bn_type == "pytorch":
        usable, target = _pytorch_sync_bn_usable(module, process_group, device)
        if usable:
            return lambda bn: nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                               bn.track_running_stats, process_group, bias=bn.bias is not None)
        logger.warning("SYNC_BN_TYPE=pytorch: torch.nn.SyncBatchNorm only runs on GPU tensors (%s); falling back "
                       "to scaleclr.SyncBatchNorm (same group statistics, works on CPU/gloo)", target)

    return lambda bn: SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                    process_group, bias=bn.bias is not None)


def _replace_bn(bn: _BatchNorm, factory: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    if isinstance(bn.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"cannot convert {type(bn).__name__} to SyncBN before its lazy parameters are initialised; "
                         "run one forward pass first")
    new = factory(bn)
    # Share (not copy) parameters and buffers: same tensors, requires_grad, device, dtype and optimizer identity.
    for name in ("weight", "bias"):
        if name in bn._parameters:
            new._parameters[name] = bn._parameters[name]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in bn._buffers:
            new._buffers[name] = bn._buffers[name]
    new.eps, new.momentum = bn.eps, bn.momentum
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    for name, child in bn.named_children():  # BN modules normally have none
        new.add_module(name, child)
    return new


def _convert(module: nn.Module, factory) -> nn.Module:
    if isinstance(module, _BatchNorm):
        return _replace_bn(module, factory)
    for name, child in module.named_children():
        new_child = _convert(child, factory)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_batchnorm(module: nn.Module, sync_bn_type: str = "native", process_group=None, *,
                           device: torch.device | str | None = None) -> nn.Module:
    """Replace every ``_BatchNorm`` (BatchNorm1d/2d/3d, trunk and heads) in ``module`` with a SyncBN.

    Call before wrapping in DDP/FSDP/DeepSpeed (VISSL ``convert_sync_bn``). Parameters and buffers (weight, bias,
    running_mean, running_var, num_batches_tracked) are shared with the replaced module -- so values, dtype,
    device, ``requires_grad`` and optimizer references are kept -- as are eps, momentum, affine, bias,
    track_running_stats and train/eval mode. Module names, hence ``state_dict`` keys, are unchanged.

    Args:
        module: model (or a single BN module, in which case the replacement is returned).
        sync_bn_type: ``MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE``:
            * ``native``: :class:`SyncBatchNorm` (scaleclr's own; CPU/gloo and CUDA/NCCL);
            * ``pytorch``: ``torch.nn.SyncBatchNorm`` when the model runs on GPU; on CPU (``device`` cpu, or the
              model on CPU and no CUDA/NCCL group) falls back to :class:`SyncBatchNorm` with a warning log line;
            * ``apex``: ``apex.parallel.SyncBatchNorm``; raises :class:`ApexNotAvailableError` (an ImportError and
              a ValueError) when apex is not installed.
        process_group: group to sync over (from :func:`create_sync_bn_process_group`); None = whole world.
        device: device the model will run on, if it has not been moved there yet (decides ``pytorch``'s fallback).

    Returns:
        ``module`` converted in place (or the new module if ``module`` itself is a BN layer).
    """
    if sync_bn_type not in SYNC_BN_TYPES:
        raise ValueError(f"MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE={sync_bn_type!r} is not supported; allowed: "
                         f"{', '.join(SYNC_BN_TYPES)}")
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise ValueError("convert_sync_batchnorm must be applied before wrapping the model in "
                         "DistributedDataParallel (pass the unwrapped module)")
    factory = _bn_factory(sync_bn_type, module, process_group, device)
    return _convert(module, factory)


def _bn_kind(m: _BatchNorm) -> str:
    if isinstance(m, SyncBatchNorm):
        return "scaleclr.SyncBatchNorm"
    if isinstance(m, nn.SyncBatchNorm):
        return "torch.nn.SyncBatchNorm"
    cls = type(m)
    if cls.__module__.split(".")[0] == "apex":
        return f"apex.parallel.{cls.__name__}"
    return "plain"


def describe_sync_bn(module: nn.Module) -> str:
    """One line for the training log saying which SyncBN is in effect, e.g.

    ``"SyncBN: scaleclr.SyncBatchNorm x53 modules, group size 2 (2 groups, world 4)"``.
    Mentions plain (unsynchronised) BatchNorm modules too; apex modules are recognised without importing apex.
    """
    kinds: Counter[str] = Counter()
    group_sizes: set[int] = set()
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            kind = _bn_kind(m)
            kinds[kind] += 1
            if kind != "plain":
                group_sizes.add(world_info(getattr(m, "process_group", None))[1])
    plain = kinds.pop("plain", 0)
    plain_txt = f"{plain} plain BatchNorm module{'s' if plain != 1 else ''} (per-rank statistics)"
    if not kinds:
        return f"SyncBN: off, {plain_txt}" if plain else "SyncBN: off (no BatchNorm modules)"
    parts = ", ".join(f"{k} x{n} modules" for k, n in sorted(kinds.items()))
    if not _dist_ready():
        where = "not distributed (local batch statistics)"
    else:
        world = dist.get_world_size()
        where = "; ".join(f"group size {g} ({world // g} group{'s' if world // g != 1 else ''}, world {world})"
                          for g in sorted(group_sizes))
    line = f"SyncBN: {parts}, {where}"
    return line + (f"; plus {plain_txt}" if plain else "")
