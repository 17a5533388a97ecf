"""What an engine needs from the configuration, built once by ``scaleclr.builders.build_engine_spec``.

Engines never see the config tree: they receive an :class:`EngineSpec`, whose fields have no defaults, so the
schema (``scaleclr/config/schema.py``) stays the single source of every default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

__all__ = ["PrecisionSpec", "FSDPSpec", "EngineSpec", "DTYPES"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class PrecisionSpec:
    """Precision policy (``config.MODEL.AMP_PARAMS``, ``FSDP_CONFIG.MIXED_PRECISION``).

    Attributes:
        autocast_dtype: dtype of ``torch.autocast`` in the forward, or None for fp32. BatchNorm keeps fp32
            parameters, running statistics and statistic accumulation; its activations stay in this dtype.
        param_dtype: dtype parameters are all-gathered in (FSDP) or stored in (DeepSpeed bf16/fp16); None = fp32.
        channels_last: model weights and input batches in ``torch.channels_last`` (NHWC) memory format.
        compile: ``torch.compile`` the trunk's blocks and the heads, with ``compile_mode`` and ``compile_backend``.
    """

    autocast_dtype: Optional[torch.dtype]
    param_dtype: Optional[torch.dtype]
    channels_last: bool
    compile: bool
    compile_mode: str
    compile_backend: str

    @property
    def grad_scaler(self) -> bool:
        """fp16 needs a loss scaler (bf16 and fp32 do not)."""
        return torch.float16 in (self.autocast_dtype, self.param_dtype)

    def describe(self) -> str:
        if self.autocast_dtype is None and self.param_dtype is None:
            text = "fp32"
        else:
            a = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "off"
            p = str(self.param_dtype).replace("torch.", "") if self.param_dtype else "float32"
            text = f"autocast {a}, parameters {p}, BatchNorm statistics fp32"
        text += ", channels_last" if self.channels_last else ", contiguous"
        return text + (f", torch.compile ({self.compile_mode}, {self.compile_backend})" if self.compile else "")


@dataclass(frozen=True)
class FSDPSpec:
    """``config.MODEL.FSDP_CONFIG``: unit (``block`` | ``stage``), reshard after forward, HSDP replicas."""

    shard_unit: str
    reshard_after_forward: bool
    hsdp_replicate: int


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine reads, from ``config.DISTRIBUTED``, ``config.MODEL`` and ``config.OPTIMIZER``.

    Attributes:
        name: ``ddp`` | ``fsdp`` | ``deepspeed``.
        precision: the precision policy.
        gradient_clipping: max global gradient norm, 0 = off.
        activation_checkpointing: recompute every residual block in backward.
        broadcast_buffers: rank 0's buffers are sent to every rank before each forward (VISSL).
        ddp_bucket_cap_mb: DDP gradient bucket size.
        fsdp: FSDP options (``ENGINE=fsdp`` only).
        deepspeed_config: the DeepSpeed JSON with every ``"auto"`` filled (``ENGINE=deepspeed`` only).
    """

    name: str
    precision: PrecisionSpec
    gradient_clipping: float
    activation_checkpointing: bool
    broadcast_buffers: bool
    ddp_bucket_cap_mb: int
    fsdp: Optional[FSDPSpec]
    deepspeed_config: Optional[Dict[str, Any]]
