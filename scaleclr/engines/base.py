"""The interface every engine implements (DDP, DeepSpeed ZeRO, FSDP2): wrap, forward, backward, step,
save/load, export.

The trainer only talks to this interface, so its loop is the same for every engine::

    engine.setup(model, make_optimizer)           # SyncBN already converted; engine wraps + builds optimizer
    engine.set_lr(lr)
    with engine.autocast():
        embedding = engine.model(views)           # [num_crops*B, D]
    engine.backward(loss)                         # the rank's own-anchor mean loss
    engine.step()                                 # unscale, clip, LARC/SGD
    engine.zero_grad()
    engine.save(dir, tag, client_state) / engine.load(path) -> client_state
    engine.full_state_dict()                      # unsharded fp32 trunk+head, on rank 0
"""
import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Engine(ABC):
    """One data-parallel training engine. Subclasses live in one file each."""

    name: str = "base"
    #: checkpoints are single files (True) or directories (False)
    checkpoint_is_file: bool = True

    def __init__(self, cfg, device: torch.device, rank: int, world_size: int):
        self.cfg = cfg  # the `config` node
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.model: Optional[nn.Module] = None  # what the trainer calls forward on
        self.module: Optional[nn.Module] = None  # the unwrapped SimCLRModel (local shards for FSDP/ZeRO-3)
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Move `model` to the device, wrap it, and build the optimizer for the wrapped parameters."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> None:
        """Optimizer step on the averaged gradients (unscaling and clipping included)."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups():
            g["lr"] = lr

    @abstractmethod
    def save(self, directory: str, tag: str, client_state: Dict[str, Any]) -> str:
        """Write checkpoint `tag` under `directory` atomically; return its path. Collective."""

    @abstractmethod
    def load(self, path: str) -> Dict[str, Any]:
        """Restore model/optimizer state from `path`; return the client state. Collective."""

    @abstractmethod
    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Unsharded fp32 state dict of the SimCLRModel (trunk.*, heads.*) on rank 0, None elsewhere.
        Collective: every rank must call it."""

    def grad_scale(self) -> float:
        return 1.0
