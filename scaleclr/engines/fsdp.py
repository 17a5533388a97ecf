"""FSDP2 engine (``config.DISTRIBUTED.ENGINE=fsdp``): torch ``fully_shard`` with the same math as DDP.

Wrapping (:func:`scaleclr.distributed.parallelize.parallelize`): SyncBN (trainer) -> activation checkpointing
(optional, per residual block) -> ``fully_shard`` per unit (``config.MODEL.FSDP_CONFIG.SHARD_UNIT``: ``block`` or
``stage``) -> root. Parameters become ``DTensor`` shards over a 1-D mesh, or a 2-D ``(replicate, shard)`` mesh for
HSDP (``HSDP_REPLICATE`` > 1), except the BatchNorm parameters, which stay replicated fp32 tensors (their
gradients are averaged with one all-reduce per step, :meth:`FSDPEngine.reduce_replicated_grads`). Sharded
gradients are reduce-scattered (averaged over ranks, in fp32), so with the loss contract (own-anchor mean loss,
gather sums gradients back) the update equals DDP's.

Exact LARC on shards: the optimizer is the same SGD(+LARC) over the same VISSL param groups as DDP, built on the
sharded module; LARC gets :func:`dtensor_norms` as its ``norm_fn``, which computes every parameter's and gradient's
*full* L2 norm from the local shards with one all-reduce of squared norms over the shard mesh dimension (never
the norm of a local shard, which would change every trust ratio; fairscale#696). Gradient clipping uses the same
full norms.

Precision: ``FSDP_CONFIG.MIXED_PRECISION`` (``none`` | ``bfloat16`` | ``float16``; with ``none``,
``AMP_PARAMS.USE_AMP`` + ``AMP_DTYPE`` select it) is FSDP2's ``MixedPrecisionPolicy`` (low-precision all-gathered
parameters, fp32 gradient reduction, fp32 sharded master weights and optimizer state) plus ``torch.autocast`` in the
same dtype, i.e. the DDP engine's AMP policy: convs/linears in low precision, BatchNorm with fp32 (replicated)
parameters, fp32 running statistics and accumulation, activations in the autocast dtype. float16 adds a dynamic
loss scaler (:class:`ShardLossScaler`: torch.amp.GradScaler's rule over sharded and replicated gradients).

Checkpoints are directories written with ``torch.distributed.checkpoint`` (DCP): sharded model and optimizer
state (``get_state_dict``/``set_state_dict``: parameters by name, resharded on load, so a checkpoint written by N
processes resumes on M), plus ``client_state.torch`` written by rank 0 (train state, sampler position, RNG,
LARC hyperparameters, grad scaler). The directory is written under a temporary name and renamed when complete.
:func:`load_full_state_dict` reads the model from such a directory without a process
group (unsharded fp32 ``trunk.*``/``heads.*``, loadable into :class:`scaleclr.models.ResNet` / ``SimCLRModel``).
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from scaleclr.distributed.collectives import broadcast_buffers, ensure_process_group
from scaleclr.distributed.parallelize import build_mesh, parallelize
from scaleclr.engines.base import Engine, MemoryLayout, ModelCounts, OptimizerFactory
from scaleclr.io import atomic_torch_save, replace_dir

logger = logging.getLogger(__name__)

__all__ = ["FSDPEngine", "ShardLossScaler", "dtensor_norms", "load_full_state_dict", "CLIENT_FILE"]

CLIENT_FILE = "client_state.torch"


def _dtensor_cls():
    from torch.distributed.tensor import DTensor
    return DTensor


def _reduce_groups(t) -> Tuple[Any, Tuple[int, ...]]:
    """(mesh, mesh dims over which `t` is sharded or partial) for a DTensor."""
    from torch.distributed.tensor import Partial, Shard

    dims = tuple(i for i, p in enumerate(t.placements) if isinstance(p, (Shard, Partial)))
    return t.device_mesh, dims


def dtensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full L2 norm of every tensor; ``DTensor`` shards are reduced over their mesh (LARC's ``norm_fn``).

    For each sharded tensor the squared norm of the local shard is computed, the squared norms of all tensors
    that share a mesh and shard dimensions are summed over those mesh dimensions with ONE all-reduce (in
    float64), and the square root is taken. Replicated mesh dimensions (HSDP's replicate dim) are not summed.
    Plain tensors are taken as whole tensors.

    Args:
        tensors: ``n`` tensors (plain or ``DTensor``), e.g. LARC's ``params + grads``.

    Returns:
        float32 tensor of shape ``[n]`` on the first tensor's local device. Collective when any input is a
        sharded ``DTensor``: every rank must call it with the same list structure.
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    DTensor = _dtensor_cls()
    locals_: List[torch.Tensor] = []
    keys: List[Any] = []
    for t in tensors:
        t = t.detach()
        if isinstance(t, DTensor):
            mesh, dims = _reduce_groups(t)
            locals_.append(t.to_local())
            keys.append((mesh, dims) if dims else None)
        else:
            locals_.append(t)
            keys.append(None)
    device = locals_[0].device
    sq = torch.stack([(x.float().norm() if x.numel() else x.new_zeros((), dtype=torch.float32)).double() ** 2
                      for x in locals_]).to(device)
    by_key: Dict[Any, List[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        if k is not None:
            by_key[(id(k[0]), k[1])].append(i)
    for (_, dims), idx in by_key.items():
        mesh = keys[idx[0]][0]
        part = sq[idx].clone()
        for d in dims:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        sq[idx] = part
    return sq.sqrt().float()


class ShardLossScaler:
    """Dynamic fp16 loss scaling over sharded (``DTensor``) and replicated gradients: ``torch.amp.GradScaler``'s
    rule (scale 2**16, x2 after 2000 finite steps, x0.5 and the step skipped on inf/NaN) and state-dict keys.

    torch's ``ShardedGradScaler`` unscales all gradients of one device and dtype in one foreach call, which cannot
    mix ``DTensor`` shards with the replicated BatchNorm parameters' plain tensors. Here the local shards and the
    replicated gradients are unscaled together as plain tensors, and the found-inf flag is summed over the ranks
    with ONE all-reduce (a shard's overflow is seen by every rank). ``step`` reads that flag on the host, as
    ``GradScaler.step`` does.
    """

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self._found_inf: Optional[torch.Tensor] = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.device)

    def get_scale(self) -> float:
        return float(self._scale)

    def unscale_(self, params: Sequence[torch.Tensor]) -> None:
        """Divide every gradient by the scale in place; record whether any rank saw a non-finite value."""
        found = torch.zeros(1, dtype=torch.float32, device=self._scale.device)
        inv = self._scale.double().reciprocal().float()
        by_dtype: Dict[Any, List[torch.Tensor]] = defaultdict(list)
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, _dtensor_cls()) else p.grad
            by_dtype[(g.device, g.dtype)].append(g)
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv.to(grads[0].device))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found)
        self._found_inf = found

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        assert self._found_inf is not None, "unscale_ before step"
        if not self._found_inf.item():
            optimizer.step()

    def update(self) -> None:
        torch._amp_update_scale_(self._scale, self._growth_tracker, self._found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)
        self._found_inf = None

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self._growth_tracker)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._scale.fill_(state["scale"])
        self._growth_tracker.fill_(state["_growth_tracker"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]


class FSDPEngine(Engine):
    """FSDP2 engine; see the module docstring."""

    name = "fsdp"
    channels_last_weights = False  # FSDP2 shards contiguous parameters only

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        fs = self.spec.fsdp
        ensure_process_group(self.device)
        world = dist.get_world_size()
        if world != self.world_size:
            raise ValueError(f"the FSDP engine was built for world size {self.world_size} but torch.distributed "
                             f"has {world} ranks")
        self.param_dtype = self.spec.precision.param_dtype
        self.mesh = build_mesh(self.device.type, world, fs.hsdp_replicate)
        self.place(model)
        self.replicated = parallelize(model, self.mesh, shard_unit=fs.shard_unit,
                                      reshard_after_forward=fs.reshard_after_forward, param_dtype=self.param_dtype)
        self.module = model
        self.model = model
        # norms looked up at call time: tests replace module-level dtensor_norms for their negative control;
        # replicated (BatchNorm) and sharded parameters in separate groups: foreach kernels cannot mix them
        self.optimizer = make_optimizer(model, norm_fn=lambda tensors: dtensor_norms(tensors),
                                        split=lambda p: "sharded" if isinstance(p, _dtensor_cls()) else "replicated")
        self.scaler = None
        if self.spec.precision.grad_scaler:
            self.scaler = ShardLossScaler(self.device)
        self.clip = float(self.spec.gradient_clipping)
        logger.info("FSDP2: mesh %s, unit=%s, reshard_after_forward=%s, %s, activation checkpointing %s",
                    tuple(self.mesh.shape), fs.shard_unit, fs.reshard_after_forward, self.spec.precision.describe(),
                    self.spec.activation_checkpointing)

    @classmethod
    def memory_layout(cls, spec, world_size: int, counts: ModelCounts) -> MemoryLayout:
        """Sharded fp32 master parameters, gradients and momentum (1/shard of each), BatchNorm's replicated fp32
        parameters whole, and one unit gathered at a time (in ``param_dtype``; with its unsharded fp32 gradient
        in backward, freed by the reduce-scatter). HSDP shards over ``world / HSDP_REPLICATE`` ranks."""
        shards = world_size // max(1, spec.fsdp.hsdp_replicate if spec.fsdp else 1)
        sharded = counts.numel - counts.replicated
        per_rank = 4 * (-(-sharded // shards) + counts.replicated)
        low = spec.precision.param_dtype
        unit_bytes = 2 if low in (torch.bfloat16, torch.float16) else 4
        gathered = counts.largest_unit * (unit_bytes + 4) if shards > 1 else 0
        if spec.fsdp is not None and not spec.fsdp.reshard_after_forward:
            gathered = sharded * unit_bytes + counts.largest_unit * 4  # every unit stays gathered until backward
        share = per_rank / (4 * counts.numel)
        return MemoryLayout(params=per_rank, grads=per_rank, optimizer=per_rank if counts.momentum else 0,
                            buffers=0, gathered=gathered, backward_grads=share, step_share=share)

    # ------------------------------------------------------------------------------------------ step
    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _params_with_grad(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` semantics with the full (all-reduced) gradient norm; returns the
        norm as a device tensor (no host sync: the clip coefficient reaches the shards as a 0-d tensor)."""
        params = self._params_with_grad()
        if not params:
            return torch.zeros(())
        norms = dtensor_norms([p.grad for p in params])
        total = norms.double().pow(2).sum().sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        with torch.no_grad():
            torch._foreach_mul_(grads, coef.to(device=grads[0].device, dtype=grads[0].dtype))
        return total

    def reduce_replicated_grads(self) -> None:
        """Average the replicated (BatchNorm) parameters' gradients over the data-parallel ranks: ONE all-reduce
        of their concatenation (FSDP reduces only the sharded parameters)."""
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if not grads or self.world_size == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(f)

    def step(self) -> None:
        self.reduce_replicated_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self._params_with_grad())
        if self.clip > 0:
            self.clip_grad_norm(self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    # ----------------------------------------------------------------------------------- checkpoints
    def _larc_hparams(self) -> Dict[str, Any]:
        return {k: getattr(self.optimizer, k) for k in ("trust_coefficient", "clip", "eps")
                if hasattr(self.optimizer, "trust_coefficient")}

    def save(self, directory: str, tag: str, client_state: Dict[str, Any], final: bool = False) -> str:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = os.path.join(directory, tag)
        tmp = os.path.join(directory, f".tmp_{tag}")
        broadcast_buffers(self.model)  # replicated state is stored once: make every rank's copy rank 0's
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        if self.rank == 0:
            atomic_torch_save({"engine": self.name, "world_size": self.world_size,
                               "mesh_shape": tuple(self.mesh.shape), "larc": self._larc_hparams(),
                               "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                               "client_state": client_state}, os.path.join(tmp, CLIENT_FILE))
        dist.barrier()
        if self.rank == 0:
            replace_dir(tmp, path)
        dist.barrier()
        return path

    def load(self, path: str) -> Dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta_path = os.path.join(path, CLIENT_FILE)
        if not os.path.isdir(path) or not os.path.exists(meta_path):
            raise ValueError(f"{path} is not an FSDP (torch.distributed.checkpoint) checkpoint directory with "
                             f"{CLIENT_FILE}; resume it with the engine that wrote it")
        meta = torch.load(meta_path, map_location="cpu", weights_only=True)
        if meta.get("engine") != self.name:
            raise ValueError(f"{path} was written by the {meta.get('engine')!r} engine; resume it with "
                             f"config.DISTRIBUTED.ENGINE={meta.get('engine')}")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        for k, v in (meta.get("larc") or {}).items():
            if hasattr(self.optimizer, k):
                setattr(self.optimizer, k, v)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        if meta.get("world_size") != self.world_size:
            logger.info("resharded %s: written by %s processes, loaded on %s", path, meta.get("world_size"),
                        self.world_size)
        return meta["client_state"]

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in sd.items()}


def load_full_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The unsharded fp32 model state (``trunk.*``, ``heads.*``) of an FSDP checkpoint directory, on CPU.

    Needs no process group (reads every shard in this process). ``{k[len("trunk."):]: v}`` of the result loads
    into :class:`scaleclr.models.ResNet`; the whole dict loads into :class:`scaleclr.models.SimCLRModel`.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not os.path.exists(os.path.join(path, ".metadata")):
        raise ValueError(f"{path} is not a torch.distributed.checkpoint directory (no .metadata)")
    meta = FileSystemReader(path).read_metadata()
    keys = {k for k in meta.state_dict_metadata if k.startswith("model.")}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys=keys, checkpoint_id=path)
    model = loaded["model"] if "model" in loaded else {k[len("model."):]: v for k, v in loaded.items()}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in model.items()}
