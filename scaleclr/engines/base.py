"""The interface every engine implements (DDP, DeepSpeed ZeRO, FSDP2): wrap, forward, backward, step,
save/load, export.

The trainer only talks to this interface, so its loop is the same for every engine::

    engine = build_engine(spec, device, rank, world_size)   # spec: scaleclr.engines.spec.EngineSpec
    engine.setup(model, make_optimizer)           # SyncBN already converted; engine wraps + builds optimizer
    engine.set_lr(lr, head_lr)
    with engine.autocast():
        embedding = engine.model(views)           # [num_crops*B, D]
    engine.backward(loss)                         # the rank's own-anchor mean loss
    engine.step()                                 # unscale, clip, LARC/SGD
    engine.zero_grad()
    engine.save(dir, tag, client_state, final) / engine.load(path) -> client_state
    engine.full_state_dict()                      # unsharded fp32 trunk+head, on rank 0

Engines import nothing from the trainer-level modules (``trainer``, ``checkpoint``, ``metrics``); shared
pieces live below them (``scaleclr.io``, ``scaleclr.distributed``, ``scaleclr.engines.precision``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from scaleclr.engines.precision import autocast
from scaleclr.engines.spec import EngineSpec

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts the memory layouts read (trainable parameters only).

    Attributes:
        numel: all parameters.
        replicated: BatchNorm parameters (FSDP keeps them replicated fp32).
        sizes: every parameter tensor's numel (DeepSpeed's ZeRO-3 keeps the small ones whole on every rank).
        largest_unit: parameters of the largest FSDP unit / residual block (gathered whole while it runs).
        momentum: the optimizer keeps a momentum buffer per parameter.
    """

    numel: int
    replicated: int
    sizes: Tuple[int, ...]
    largest_unit: int
    momentum: bool


@dataclass(frozen=True)
class MemoryLayout:
    """Bytes per rank an engine holds for the model (``Engine.memory_layout``; read by ``scaleclr.plan``).

    Attributes:
        params: parameters as the engine stores them (full, sharded, low precision).
        grads: gradients held through the optimizer step.
        optimizer: momentum and fp32 master copies.
        buffers: communication buckets allocated once.
        gathered: unsharded parameters (and their gradients) of the units in flight: ZeRO-3 / FSDP, transient.
        backward_grads: share of the full-size fp32 gradients (the trace's) live during backward.
        step_share: share of the full model the optimizer steps on this rank (its temporaries scale with it).
        gathered_forward: ``gathered`` during forward where it differs (ZeRO-3's all-gather buffers beside the
            parameters copied out of them); None: the same.
        gathered_backward: ``gathered`` at each point of the backward, where it varies (ZeRO-3: the running
            unit's parameters, and its gradient bucket when it is reduce-scattered): ``(units, arrived) -> bytes``
            per point, from the running unit's parameter count and the parameters whose gradients have arrived
            so far (:class:`scaleclr.planner.trace.StepTrace`'s points); None: ``gathered`` throughout.
    """

    params: int
    grads: int
    optimizer: int
    buffers: int
    gathered: int
    backward_grads: float
    step_share: float
    gathered_forward: Optional[int] = None
    gathered_backward: Optional[Callable[[Sequence[int], Sequence[int]], List[int]]] = None


class Engine(ABC):
    """One data-parallel training engine. Subclasses live in one file each.

    Args:
        spec: what the engine reads from the configuration (built once by ``builders.build_engine_spec``).
        device: ``cuda:<i>`` or ``cpu``.
        rank, world_size: this process's place in the default process group.
    """

    name: str = "base"
    #: whether ``channels_last`` also converts the weights (engines that flatten or shard parameters need them
    #: contiguous; activations are channels_last all the same, as convolutions follow their input's format)
    channels_last_weights: bool = True
    #: whether the run's final checkpoint comes with a consolidated fp32 export (``<tag>_consolidated_fp32.torch``,
    #: written by the trainer through :mod:`scaleclr.interchange`): for checkpoints offline readers cannot read
    consolidate_final: bool = False

    def __init__(self, spec: EngineSpec, device: torch.device, rank: int, world_size: int):
        self.spec = spec
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.model: Optional[nn.Module] = None  # what the trainer calls forward on
        self.module: Optional[nn.Module] = None  # the unwrapped SimCLRModel (local shards for FSDP/ZeRO-3)
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Move `model` to the device, wrap it, and build the optimizer for the wrapped parameters."""

    def place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device in the spec's memory format (``channels_last``: 4-d weights NHWC where the
        engine allows it), then apply activation checkpointing and ``torch.compile`` as the spec says, in that
        order, before the engine wraps or shards it."""
        model.to(self.device)
        if self.spec.precision.channels_last and self.channels_last_weights:
            model.to(memory_format=torch.channels_last)
        if self.spec.activation_checkpointing:
            from scaleclr.distributed.parallelize import apply_activation_checkpointing
            apply_activation_checkpointing(model)  # per residual block; same values, less activation memory
        if self.spec.precision.compile:
            from scaleclr.distributed.compile import apply_compile
            apply_compile(model, self.spec.precision.compile_mode, self.spec.precision.compile_backend)
        return model

    @classmethod
    def memory_layout(cls, spec: EngineSpec, world_size: int, counts: ModelCounts) -> MemoryLayout:
        """What this engine keeps per rank (DDP's layout; sharded engines override it): fp32 parameters,
        fp32 gradients, momentum, and DDP's gradient buckets (one fp32 copy of every gradient, world > 1)."""
        p = 4 * counts.numel
        return MemoryLayout(params=p, grads=p, optimizer=p if counts.momentum else 0,
                            buffers=p if world_size > 1 else 0, gathered=0, backward_grads=1.0, step_share=1.0)

    def autocast(self):
        """The forward's autocast context (``spec.precision.autocast_dtype``; none in fp32)."""
        return autocast(self.device, self.spec.precision.autocast_dtype)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> None:
        """Optimizer step on the averaged gradients (unscaling and clipping included)."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def set_lr(self, lr: float, head_lr: Optional[float] = None) -> None:
        """Set every group's LR; with ``head_lr`` the head's groups (``name`` ``head_*``) get it instead."""
        for g in self.param_groups():
            g["lr"] = head_lr if head_lr is not None and str(g.get("name", "")).startswith("head") else lr

    @abstractmethod
    def save(self, directory: str, tag: str, client_state: Dict[str, Any], final: bool = False) -> str:
        """Write checkpoint `tag` under `directory` atomically; return its path. ``final``: the run's last
        checkpoint. Collective."""

    def checkpoint_meta(self) -> Dict[str, Any]:
        """What an offline reader needs to know of this engine's checkpoints (stored with exports)."""
        return {"engine": self.name, "world_size": self.world_size}

    @abstractmethod
    def load(self, path: str) -> Dict[str, Any]:
        """Restore model/optimizer state from `path`; return the client state. Collective."""

    @abstractmethod
    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Unsharded fp32 state dict of the SimCLRModel (trunk.*, heads.*) on rank 0, None elsewhere.
        Collective: every rank must call it."""
