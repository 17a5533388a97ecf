"""``torch.compile`` applied from outside the model: every residual block and every head, static shapes, one
compiled graph per distinct (block structure, input shape).

**What compiles.** Each residual block and each head gets ``_compiled_call_impl`` (what ``nn.Module.compile()``
sets: parameter and state-dict names unchanged), so it works with every engine that allows compile and with
activation checkpointing: DDP wraps the model afterwards, FSDP2 shards the compiled blocks (torchtitan's order:
activation checkpointing -> compile -> FSDP), and a checkpointed block is recomputed through its compiled code.
Compiling the whole model at once fails with composable activation checkpointing ("Recomputed values have
different metadata"). The stem (``conv1``/``bn1``/``maxpool``) and the pooling run eagerly: a few percent of the
trunk's FLOPs. Module hooks (FSDP2's, activation checkpointing's) run eagerly around the compiled ``forward``.

**Compile regions.** Dynamo caches compiled code on the *code object* (``Bottleneck.forward``, shared by every
block) and stops recompiling after ``torch._dynamo.config.recompile_limit`` (8) entries, falling back to eager
silently. One ``module.compile()`` per block therefore hits the limit with ResNet-50 and two crop resolutions
(4 stages x 2 block structures x 2 resolutions: 16 entries of ``Bottleneck.forward``), and dynamo's automatic
dynamic shapes turn the recompiles into symbolic-shape graphs. Here every distinct block structure (type and
``repr``: channels, stride, downsample, norm layer) gets its own ``torch.compile(..., dynamic=False,
isolate_recompiles=True)`` region:

* blocks of one structure share one region, so they share compiled code (ResNet-101's 22 equal ``layer3`` blocks
  compile once per input shape);
* the recompile limit counts per region: each region holds one entry per input shape it sees (multicrop: one per
  crop resolution, plus evaluation-mode shapes), far below the limit;
* ``dynamic=False``: every graph is specialised to its shapes (no symbolic sizes, the fastest kernels).

A ResNet-50 step thus compiles 8 graphs per crop resolution plus one per head and concatenated batch shape
(SimCLR's two heads: two views 10 graphs, multicrop with 2 resolutions 18). scaleclr's SyncBatchNorm (its
collectives included) traces without graph breaks; torch's and apex's do not (:func:`sync_bn_type_for_compile`).
Compilation happens lazily in the first step (the trainer logs its time); set ``TORCHINDUCTOR_CACHE_DIR`` to a
persistent folder to reuse compiled kernels across runs and processes.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Dict, List, Tuple, Union

import torch
from torch import nn

from scaleclr.distributed.parallelize import residual_blocks

logger = logging.getLogger(__name__)

__all__ = ["apply_compile", "compile_units", "compile_regions", "sync_bn_type_for_compile"]

Backend = Union[str, Callable]


def compile_units(model: nn.Module) -> List[nn.Module]:
    """The modules :func:`apply_compile` compiles: the residual blocks in forward order, then the heads."""
    return residual_blocks(model) + list(getattr(model, "heads", []))


def compile_regions(units: List[nn.Module]) -> Dict[Tuple[type, str], List[nn.Module]]:
    """``units`` grouped by structure, ``(type, repr)`` -> modules: the modules of one group run the same code on
    parameters of the same shapes, so one compiled graph per input shape serves them all."""
    regions: Dict[Tuple[type, str], List[nn.Module]] = {}
    for unit in units:
        regions.setdefault((type(unit), repr(unit)), []).append(unit)
    return regions


def apply_compile(model: nn.Module, mode: str = "default", backend: Backend = "inductor") -> int:
    """``torch.compile`` every residual block and every head of ``model`` in place; returns how many modules.

    Args:
        model: a :class:`SimCLRModel` (SyncBN converted and activation checkpointing applied already), before
            any engine wraps it.
        mode: ``config.MODEL.TORCH_COMPILE_MODE`` (``default``, ``reduce-overhead``, ``max-autotune``, ...).
        backend: ``config.MODEL.TORCH_COMPILE_BACKEND`` (``inductor``; ``aot_eager`` traces without code
            generation, for debugging and the CPU tests), or a backend callable.
    """
    units = compile_units(model)
    regions = compile_regions(units)
    for members in regions.values():
        # one region per structure: its own recompile budget (isolate_recompiles), static shapes (dynamic=False)
        compiled = torch.compile(nn.Module._call_impl, mode=None if mode == "default" else mode, backend=backend,
                                 dynamic=False, isolate_recompiles=True)
        for unit in members:
            unit._compiled_call_impl = functools.partial(compiled, unit)  # what nn.Module.compile() sets
    logger.info("torch.compile (%s, backend %s, static shapes): %d residual blocks and heads in %d regions, one "
                "graph per region and input shape", mode, getattr(backend, "__name__", backend), len(units),
                len(regions))
    return len(units)


def sync_bn_type_for_compile(sync_bn_type: str, compile: bool) -> str:
    """The SyncBN implementation to convert to (``config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE``) given
    ``config.MODEL.TORCH_COMPILE``.

    torch's ``nn.SyncBatchNorm`` filters the gathered statistics with a boolean mask (``count_all[mask]``,
    ``torch/nn/modules/_functions.py``): an output shape that depends on values, which breaks the compiled graph
    and synchronises the host in every BatchNorm layer; apex's calls C++ extension ops dynamo cannot trace. With
    compile on both are replaced by scaleclr's SyncBatchNorm (``native``: the same group statistics, traced
    without graph breaks).
    """
    if compile and sync_bn_type in ("pytorch", "apex"):
        logger.info("config.MODEL.TORCH_COMPILE=True: SyncBN is scaleclr's (native) instead of "
                    "SYNC_BN_TYPE=%s, which breaks compiled graphs", sync_bn_type)
        return "native"
    return sync_bn_type
