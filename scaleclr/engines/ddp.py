"""DDP engine: the reference engine (and the single-process path when world_size == 1).

Parameters and buffers are broadcast from rank 0 when DDP wraps the model; gradients are averaged over
ranks, so with the loss contract (each rank returns its own-anchor mean, the gather sums gradients back)
the update equals one process on the concatenated batch. Mixed precision: torch autocast (bf16, or fp16
with a GradScaler) under the BatchNorm policy of :mod:`scaleclr.engines.precision`; LARC sees unscaled
gradients (the scaler unscales first). Checkpoints are one file written by rank 0 (temp file + rename).
"""
import inspect
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scaleclr.distributed.collectives import broadcast_buffers
from scaleclr.engines.base import Engine, OptimizerFactory
from scaleclr.io import atomic_torch_save


class DDPEngine(Engine):
    name = "ddp"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.place(model)
        self.module = model
        if self.world_size > 1:
            kw = dict(bucket_cap_mb=self.spec.ddp_bucket_cap_mb)
            # BROADCAST_BUFFERS (VISSL): rank 0's buffers are sent before every forward. torch 2.14 renamed it.
            sync_key = "forward_sync_buffers" if "forward_sync_buffers" in \
                inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers"
            kw[sync_key] = self.spec.broadcast_buffers
            if self.device.type == "cuda":
                kw["device_ids"] = [self.device.index]
            self.model = DistributedDataParallel(model, **kw)
        else:
            self.model = model
        self.optimizer = make_optimizer(self.module)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.spec.precision.grad_scaler)
        self.clip = float(self.spec.gradient_clipping)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.scaler.is_enabled() or self.clip > 0:
            self.scaler.unscale_(self.optimizer)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def save(self, directory: str, tag: str, client_state: Dict[str, Any], final: bool = False) -> str:
        path = os.path.join(directory, f"{tag}.torch")
        # without SyncBN each rank's running statistics drift between forwards: save (and keep) rank 0's
        broadcast_buffers(self.module)
        if self.rank == 0:
            state = {"engine": self.name, "model": self.module.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                     "client_state": client_state}
            atomic_torch_save(state, path)
        if dist.is_initialized():
            dist.barrier()
        return path

    def load(self, path: str) -> Dict[str, Any]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("engine", "ddp") != self.name:
            raise ValueError(f"{path} was written by the {state.get('engine')!r} engine; resume it with "
                             f"config.DISTRIBUTED.ENGINE={state.get('engine')} or export its weights first.")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return state["client_state"]

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        if self.rank != 0:
            return None
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.module.state_dict().items()}
