"""``torch.compile`` applied from outside the model: every residual block and every head, compiled in place.

Compiling per block (``module.compile()``: parameter and state-dict names unchanged) works with every
engine and with activation checkpointing: DDP and DeepSpeed wrap the model afterwards, FSDP2 shards the compiled
blocks (torchtitan's order: activation checkpointing -> compile -> FSDP), and a checkpointed block is recomputed
through its compiled code. Compiling the whole model at once fails with composable activation checkpointing
("Recomputed values have different metadata"), so this one mechanism is used in every configuration. The stem
(``conv1``/``bn1``/``maxpool``) and the pooling run eagerly: a few percent of the trunk's FLOPs.

scaleclr's SyncBatchNorm (its collectives included) traces without graph breaks; blocks of equal shapes share
compiled code. Compilation happens lazily in the first step (the trainer logs its time); set
``TORCHINDUCTOR_CACHE_DIR`` to a persistent folder to reuse compiled kernels across runs and processes.
"""
from __future__ import annotations

import logging

from torch import nn

from scaleclr.distributed.parallelize import residual_blocks

logger = logging.getLogger(__name__)

__all__ = ["apply_compile"]


def apply_compile(model: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """``torch.compile`` every residual block and every head of ``model`` in place; returns how many modules.

    Args:
        model: a :class:`SimCLRModel` (SyncBN converted and activation checkpointing applied already), before
            any engine wraps it.
        mode: ``config.MODEL.TORCH_COMPILE_MODE`` (``default``, ``reduce-overhead``, ``max-autotune``, ...).
        backend: ``config.MODEL.TORCH_COMPILE_BACKEND`` (``inductor``; ``aot_eager`` traces without code
            generation, for debugging and the CPU tests).
    """
    units = residual_blocks(model) + list(getattr(model, "heads", []))
    for unit in units:
        unit.compile(mode=None if mode == "default" else mode, backend=backend)
    logger.info("torch.compile (%s, backend %s): %d residual blocks and heads", mode, backend, len(units))
    return len(units)
