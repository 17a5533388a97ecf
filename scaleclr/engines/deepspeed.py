"""DeepSpeed engine: ZeRO stages 0-3 with exact LARC, SyncBN, bf16/fp16 and resumable checkpoints.

The only module in scaleclr that imports ``deepspeed`` (lazily, inside functions), so ``import scaleclr``
and every other engine work without it.

Launch::

    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/zero2.json config=... \\
        config.DISTRIBUTED.NUM_PROC_PER_NODE=2
    python train.py config=... config.DISTRIBUTED.ENGINE=deepspeed \\
        config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero3.json          # spawn launcher, torchrun, srun

The JSON is filled from the Hydra config (:mod:`scaleclr.config.deepspeed_json`): batch sizes, gradient
clipping and bf16/fp16 are "auto" there.

**LARC under ZeRO** (the hard part). LARC's trust ratio ``tc * ||p|| / (||g|| + wd * ||p||)`` (You et al.
2017, used by SimCLR, arXiv 2002.05709 Sec. 2.2) needs the norms of every *original* parameter. ZeRO-1/2
hand the client optimizer one flat fp32 partition per param group (a contiguous slice of the concatenation
of the group's parameters, cut at arbitrary element boundaries); ZeRO-3 hands it the concatenation of each
parameter's own 1/N slice (plus alignment padding); bf16/fp16 at stage 0 hand it fp32 masters (one per
parameter with DeepSpeed's unfused fp16 optimizer, one flat copy per group with the fused one). Plain LARC
would then compute one trust ratio per flat partition, which is wrong (the negative control of
tests/test_deepspeed_engine.py shows it). :class:`ZeroLARC` instead:

1. after ``deepspeed.initialize`` reads DeepSpeed's own bookkeeping (``_hp_mapping`` of ZeRO-1/2 and the
   bf16 optimizer, ``ds_tensor`` partitions of ZeRO-3, the flat groups of the fp16 optimizer) into a
   :class:`FlatLayout` per flat tensor: for every original parameter of the group, the ``(start, numel)``
   of its local fragment (``numel`` 0 when this rank holds none of it; ZeRO-3's alignment padding is
   excluded);
2. at each step views every fragment of the flat parameter and of its gradient as a "parameter" and runs
   the unmodified single-process :class:`scaleclr.optim.LARC` math on them (weight decay folding, clip
   mode, zero-norm handling), with a ``norm_fn`` that computes the squared norms of the local fragments
   and sums them over the data-parallel group with ONE all-reduce (per flat group), so each fragment is
   scaled by the trust ratio of its full parameter;
3. then runs the inner SGD on the flat partition (element-wise, identical to per-parameter SGD).

DeepSpeed unscales (fp16) and clips gradients before calling the client optimizer, so LARC sees unscaled,
clipped gradients, as in the DDP engine. The LR reaches the groups DeepSpeed steps (``set_lr`` writes the
client optimizer's groups, which ZeRO steps).

**BatchNorm.** SyncBN is converted by the trainer before ``deepspeed.initialize``. BN buffers are module
buffers, which ZeRO never partitions; as DDP does (``BROADCAST_BUFFERS``) they are broadcast from rank 0
before every forward, so they stay identical on all ranks even without SyncBN. Under bf16/fp16 DeepSpeed
stores parameters in low precision (with fp32 masters in the optimizer) and keeps buffers in fp32; every
BN layer computes in fp32 (its input and its parameters are cast up for the layer; gradients flow back to
the low-precision copies), and its running statistics stay fp32.

**Checkpoints** are DeepSpeed checkpoint directories ``<CHECKPOINT.DIR>/<tag>/`` written by
``engine.save_checkpoint`` with scaleclr's client state, plus ``scaleclr_meta.json`` (world size, ZeRO
stage, precision). Resuming with another number of processes or another ZeRO stage stops with an error
saying how to continue (the consolidated export, below). The run's final checkpoint comes with
``<tag>_consolidated_fp32.torch`` (``consolidate_final``: a ZeRO-0 bf16/fp16 checkpoint keeps its fp32 masters in
the optimizer state, out of reach of offline readers), written by the trainer through
:mod:`scaleclr.interchange`; ``python -m scaleclr.export <checkpoint dir> <out.torch> --format scaleclr`` exports
any checkpoint offline (:func:`read_fp32_state_dict`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from scaleclr.distributed.collectives import broadcast_buffers, collective_device, ensure_process_group
from scaleclr.engines.base import Engine, MemoryLayout, ModelCounts, OptimizerFactory
from scaleclr.engines.precision import batchnorm_fp32
from scaleclr.io import atomic_write_text, fsync_dir, fsync_files
from scaleclr.optim.larc import LARC

logger = logging.getLogger(__name__)

META_FILE = "scaleclr_meta.json"


# ------------------------------------------------------------------------------------------ LARC under ZeRO
@dataclass
class FlatLayout:
    """Where the original parameters of one param group live in one flat fp32 tensor on this rank.

    Attributes:
        flat: the flat fp32 tensor DeepSpeed gives the client optimizer (1-D).
        fragments: per original parameter of the group (same order on every rank), ``(start, numel)`` of
            its local fragment in ``flat``; ``numel == 0`` when this rank holds none of it.
        partitioned: the fragments are 1/N slices (ZeRO 1-3): norms are summed over ``group``.
        group: the data-parallel process group the partitions are spread over.
    """

    flat: torch.Tensor
    fragments: List[Tuple[int, int]]
    partitioned: bool
    group: Any = None


def _dp_rank(group) -> int:
    return dist.get_rank(group=group) if dist.is_initialized() else 0


def build_flat_layouts(ds_optimizer) -> Dict[int, FlatLayout]:
    """Reads DeepSpeed's partition bookkeeping into ``{id(flat tensor): FlatLayout}``.

    Handles ``DeepSpeedZeroOptimizer`` (ZeRO-1/2), ``BF16_Optimizer`` (bf16 + ZeRO-1), ``FP16_Optimizer``
    (bf16/fp16 at ZeRO-0) and ``DeepSpeedZeroOptimizer_Stage3``. Returns ``{}`` when DeepSpeed steps the
    client optimizer on the original parameters (fp32 ZeRO-0).
    """
    layouts: Dict[int, FlatLayout] = {}
    cls = type(ds_optimizer).__name__
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for sub, params in enumerate(ds_optimizer.fp16_groups):
            flat = ds_optimizer.fp32_partitioned_groups_flat[sub]
            frags, offset = [], 0
            for p in params:
                part = p.partition_numel()
                rank = _dp_rank(getattr(p, "ds_process_group", None))
                valid = max(0, min(part, p.ds_numel - rank * part))  # the last partition is padded
                frags.append((offset, valid))
                offset += part
            assert offset == flat.numel(), (cls, sub, offset, flat.numel())
            layouts[id(flat)] = FlatLayout(flat, frags, True, ds_optimizer.dp_process_group)
        return layouts
    if hasattr(ds_optimizer, "single_partition_of_fp32_groups") or hasattr(ds_optimizer,
                                                                           "fp32_groups_flat_partition"):
        # ZeRO-1/2 (DeepSpeedZeroOptimizer) or BF16_Optimizer: link_hp_params gave every lp param with a
        # fragment in this rank's partition an _hp_mapping (None otherwise).
        if hasattr(ds_optimizer, "single_partition_of_fp32_groups"):
            lp_groups, flats = ds_optimizer.bit16_groups, ds_optimizer.single_partition_of_fp32_groups
        else:
            lp_groups, flats = ds_optimizer.bf16_groups, ds_optimizer.fp32_groups_flat_partition
        for i, (params, flat) in enumerate(zip(lp_groups, flats)):
            frags = []
            for p in params:
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    frags.append((0, 0))
                else:
                    a = m.get_hp_fragment_address()
                    frags.append((int(a.start), int(a.numel)))
            group = ds_optimizer.real_dp_process_group[i]
            layouts[id(flat)] = FlatLayout(flat, frags, True, group)
        return layouts
    if hasattr(ds_optimizer, "fp32_groups_flat"):  # FP16_Optimizer: unpartitioned flat copies
        for params, flat in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups_flat):
            frags, offset = [], 0
            for p in params:
                frags.append((offset, p.numel()))
                offset += p.numel()
            layouts[id(flat)] = FlatLayout(flat, frags, False, None)
        return layouts
    return layouts


class ZeroLARC(LARC):
    """LARC whose trust ratios come from the full norms of the original parameters under ZeRO.

    Same constructor and semantics as :class:`scaleclr.optim.LARC`; call :meth:`bind` with DeepSpeed's
    optimizer after ``deepspeed.initialize`` (and after loading a checkpoint). Param groups DeepSpeed steps
    on flat tensors are split into per-parameter fragments (:class:`FlatLayout`); groups holding the
    original parameters (fp32 ZeRO-0) are handled exactly like plain LARC.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001, clip: bool = False,
                 eps: float = 1e-8) -> None:
        super().__init__(optimizer, trust_coefficient=trust_coefficient, clip=clip, eps=eps,
                         norm_fn=self._full_norms)
        self.layouts: Dict[int, FlatLayout] = {}
        self._bound = False
        self._entry_layouts: List[Optional[FlatLayout]] = []  # per entry of the step in progress
        self._views: List[torch.Tensor] = []  # fragment views whose .grad must be dropped after the step

    def bind(self, ds_optimizer) -> None:
        self.layouts = build_flat_layouts(ds_optimizer)
        self._bound = True

    def _full_norms(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full L2 norms of the original parameters/gradients whose local fragments are ``tensors``.

        ``tensors`` is ``params + grads`` (LARC's call); fragments of partitioned layouts are reduced with ONE
        all-reduce of their squared norms per call (DeepSpeed keeps one process-group object per param group;
        groups with the same ranks share the collective). ZeRO 1-3 call the client optimizer once per param group
        (sub-group), creating that group's fp32 gradient partition just before, so under ZeRO the count is one
        all-reduce per LARC-adapted param group and step (2 with VISSL's SimCLR groups: trunk and head).
        """
        n = len(tensors)
        if n == 0:
            return torch.zeros(0)
        # squared norms as n 0-d device tensors: a group's entries are gathered with torch.stack and put back with
        # unbind, never by indexing with a Python list (that would copy an index tensor to the device every step)
        sq = [t.to(torch.float64) ** 2 for t in torch._foreach_norm(
            [t.detach().float() if t.dtype not in (torch.float32, torch.float64) else t.detach() for t in tensors])]
        layouts = self._entry_layouts * 2  # params then grads
        by_group: Dict[Any, Tuple[Any, List[int]]] = {}
        for i, lay in enumerate(layouts):
            if lay is not None and lay.partitioned:
                key = tuple(dist.get_process_group_ranks(lay.group if lay.group is not None else dist.group.WORLD)) \
                    if dist.is_initialized() else None
                by_group.setdefault(key, (lay.group, []))[1].append(i)
        for group, idx in by_group.values():
            part = torch.stack([sq[i] for i in idx])
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                # offloaded partitions live on the CPU; NCCL needs the reduction on the GPU
                on_dev = part.to(collective_device())
                dist.all_reduce(on_dev, op=dist.ReduceOp.SUM, group=group)
                part = on_dev.to(part.device)
            for i, v in zip(idx, part.unbind()):
                sq[i] = v
        return torch.stack(sq).sqrt()

    def _group_entries(self, group: Dict[str, Any], weight_decay: float
                       ) -> List[Tuple[torch.Tensor, float, Any]]:
        """Per-parameter fragments of the flat tensors DeepSpeed steps (views with views of the flat grad)."""
        entries = []
        for p in group["params"]:
            if p.grad is None:
                continue
            lay = self.layouts.get(id(p))
            if lay is None or lay.flat is not p:
                if self._bound and self.layouts:
                    raise RuntimeError("ZeroLARC: DeepSpeed stepped a tensor it has no partition layout "
                                       f"for (shape {tuple(p.shape)}); call bind() after initialize/load")
                entries.append((p, weight_decay, group["lr"]))
                self._entry_layouts.append(None)
                continue
            flat_p, flat_g = p.detach().view(-1), p.grad.view(-1)
            for start, numel in lay.fragments:
                view = flat_p.narrow(0, start, numel)
                view.grad = flat_g.narrow(0, start, numel)
                self._views.append(view)
                entries.append((view, weight_decay, group["lr"]))
                self._entry_layouts.append(lay)
        return entries

    def _finish_step(self) -> None:
        for view in self._views:  # drop the fragment views' grads: they would keep DeepSpeed's flat grads alive
            view.grad = None
        self._views, self._entry_layouts = [], []


def _skip_cpu_shm_comm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op when its comm backend starts
    (minutes on a cold cache). That op only serves inference all-reduces; training collectives go through
    torch.distributed (gloo) either way, so its build is skipped there."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    if get_accelerator().device_name() == "cpu":
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict) and "deepspeed_shm_comm" in compatible:
            compatible["deepspeed_shm_comm"] = False


def check_resumable(path: str, meta: Dict[str, Any], now: Dict[str, Any]) -> None:
    """Raise ValueError (saying how to continue) when checkpoint ``path`` (``meta``) cannot be resumed by this run
    (``now``): ZeRO 1-3 optimizer state is partitioned by process, so the world size and the stage must match.
    ZeRO-0 checkpoints hold the whole optimizer state and resume with any number of processes."""
    partitioned = max(int(meta["zero_stage"]), int(now["zero_stage"])) >= 1
    if partitioned and (meta["world_size"] != now["world_size"] or meta["zero_stage"] != now["zero_stage"]):
        raise ValueError(
            f"{path} was written by {meta['world_size']} processes with ZeRO-{meta['zero_stage']}; this run "
            f"has {now['world_size']} processes with ZeRO-{now['zero_stage']}. ZeRO partitions the optimizer "
            "state by process, so the checkpoint cannot be resumed as is (DeepSpeed's universal checkpoints do "
            "not cover SGD momentum). Either resume with the same number of processes and the same ds_config, "
            f"or export the weights and restart from them: `python -m scaleclr.export {path} "
            "model_fp32.torch --format scaleclr` writes the consolidated fp32 trunk + heads (loadable without DeepSpeed), then "
            "train with config.MODEL.WEIGHTS_INIT.PARAMS_FILE=model_fp32.torch and a new config.CHECKPOINT.DIR "
            "(the SGD momentum and the LR schedule restart).")


def deepspeed_local_rank(device: torch.device, environ=os.environ) -> str:
    """The ``LOCAL_RANK`` DeepSpeed must see: it sets its device from it, so on CUDA it is the index of the device
    scaleclr chose (srun may bind one GPU per task, so local rank 3 can be ``cuda:0``); a bare ``cuda`` means
    the current device. On CPU the launcher's ``LOCAL_RANK``, else 0 (present when no launcher exported it)."""
    if device.type == "cuda":
        return str(device.index if device.index is not None else torch.cuda.current_device())
    return str(environ.get("LOCAL_RANK", 0))


# ------------------------------------------------------------------------------------------------ engine
class DeepSpeedEngine(Engine):
    name = "deepspeed"
    channels_last_weights = False  # ZeRO flattens parameters into contiguous buffers
    consolidate_final = True  # ZeRO-0 bf16/fp16 keeps its fp32 masters in the optimizer state: no offline reader

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        import deepspeed

        if self.spec.precision.compile:  # config validation refuses it (config.MODEL.TORCH_COMPILE)
            raise ValueError("torch.compile is not supported with the DeepSpeed engine; use ddp or fsdp")
        self.ds_config = self.spec.deepspeed_config
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.bf16 = bool(self.ds_config["bf16"]["enabled"])
        self.fp16 = bool(self.ds_config["fp16"]["enabled"])
        ensure_process_group(self.device)
        self.place(model)
        if self.spec.broadcast_buffers and self.world_size > 1:
            # ZeRO never partitions buffers; like DDP's BROADCAST_BUFFERS, rank 0's are sent before every forward
            model.register_forward_pre_hook(lambda module, args: broadcast_buffers(module))

        _skip_cpu_shm_comm_build()
        os.environ["LOCAL_RANK"] = deepspeed_local_rank(self.device)
        optimizer = make_optimizer(model)
        client = optimizer
        if isinstance(optimizer, LARC):
            client = ZeroLARC(optimizer.optim, optimizer.trust_coefficient, optimizer.clip, optimizer.eps)
        self.ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client, config=self.ds_config,
                                                           dist_init_required=False)
        self.ds_optimizer = ds_optimizer
        if isinstance(client, ZeroLARC):
            client.bind(ds_optimizer)
        self.client = client
        self.optimizer = client  # param_groups / set_lr reach the groups DeepSpeed steps
        self.model = self.ds
        self.module = self.ds.module
        batchnorm_fp32(self.module)  # bf16/fp16 store BN parameters and buffers in low precision
        logger.info("DeepSpeed ZeRO-%d (%s), %s, optimizer %s, activation checkpointing %s", self.stage,
                    "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32", type(ds_optimizer).__name__,
                    type(client).__name__, self.spec.activation_checkpointing)

    @classmethod
    def memory_layout(cls, spec, world_size: int, counts: ModelCounts) -> MemoryLayout:
        """DeepSpeed 0.19's layout per ZeRO stage (``spec.deepspeed_config``), N = ``world_size``, P parameters,
        checked against the live tensors of real steps (``tests/test_plan.py``, ``benchmarks/procmem.py``):

        * parameters on the module in the low precision (bf16/fp16: 2 bytes, fp32: 4); ZeRO-3: 1/N of them,
          except tensors under ``stage3_param_persistence_threshold``;
        * an fp32 master partition (4P/N) at every stage >= 1, even in fp32 training (ZeRO-0: only in bf16/fp16,
          unpartitioned), and momentum beside it;
        * gradients: ZeRO-0 keeps the module's; ZeRO-1/2 (one optimizer class in 0.19) hold the module's
          low-precision gradients through backward (ZeRO-1) or reduce them as they come (ZeRO-2), and then
          only their partition, in the model's precision (``copy_grads_in_partition``; R50 bf16, 2 ranks:
          measured); ZeRO-3 a partition, always, in ``data_types.grad_accum_dtype`` (default: the model's
          precision; R50 bf16, 2 ranks: 2 bytes per parameter of the partition, measured);
        * a ``reduce_bucket_size`` bucket: ZeRO-1/2 from the first gradient of backward, only with N > 1;
          ZeRO-3 from initialisation, on any N (no ``allgather_bucket_size`` buffer: the updated partitions are
          all-gathered into the module's flat parameters);
        * ZeRO-3's gathered parameters. In forward (prefetch bucket + the running block, at most
          ``stage3_max_live_parameters`` unless one tensor is larger) twice over: each coalesced all-gather
          lands in one flat buffer from which every parameter is copied out (``AllGatherCoalescedHandle.wait``:
          ``param.data = torch.cat(partitions)``), and the buffer lives until the last parameter of its group is
          used (R18, 2 ranks: 84 MiB gathered at the forward peak, twice the fp32 model). In backward, per
          point (``gathered_backward``): the running unit's parameters, the prefetch bucket, and where a
          gradient overflows the ``reduce_bucket_size`` bucket (``reduce_independent_p_g_buckets_and_remove_
          grads``), two copies of the bucket being reduce-scattered (``torch.cat``, then ``split``; R50-w2,
          2 ranks, layer 4: 92 + 36 + 2 x 68 MiB; R50, layer 3: 3 + 26 + 2 x 75 MiB). With checkpointing the
          peak is such a reduce where few activations are live, not layer 1's recomputation (the largest
          unit's bytes held throughout over-predict R50-w2's growth per image by 17 %).
        """
        ds = spec.deepspeed_config or {}
        z = ds.get("zero_optimization", {})
        stage = int(z.get("stage", 0))
        low = 2 if spec.precision.param_dtype in (torch.bfloat16, torch.float16) else 4
        n, part = counts.numel, -(-counts.numel // world_size)
        bucket = int(z.get("reduce_bucket_size", 5 * 10 ** 8))
        if stage < 3 and world_size == 1:
            bucket = 0
        elif stage == 3 and not z.get("contiguous_gradients", True):
            bucket = 0
        fp32_names = ("fp32", "float32", "float", "torch.float32")  # DeepSpeed's DtypeEnum spellings of fp32
        accum = 4 if str(ds.get("data_types", {}).get("grad_accum_dtype")) in fp32_names else low
        mom = 4 * (part if stage else n) if counts.momentum else 0
        master = 4 * part if stage else (4 * n if low == 2 else 0)
        if stage == 0:
            return MemoryLayout(low * n, low * n, mom + master, low * bucket, 0, low / 4, 1.0)
        if stage == 1:
            return MemoryLayout(low * n, low * part, mom + master, low * bucket, 0, low / 4, 1 / world_size)
        if stage == 2:
            return MemoryLayout(low * n, low * part, mom + master, low * bucket, 0, 0.0, 1 / world_size)
        prefetch = min(int(z.get("stage3_prefetch_bucket_size", 5 * 10 ** 7)), n)
        live = max(min(counts.largest_unit + prefetch, int(z.get("stage3_max_live_parameters", 10 ** 9)), n),
                   max(counts.sizes, default=0))
        small = sum(k for k in counts.sizes if k < int(z.get("stage3_param_persistence_threshold", 10 ** 5)))
        size = int(z.get("reduce_bucket_size", 5 * 10 ** 8))

        def backward(units: Sequence[int], arrived: Sequence[int]) -> List[int]:
            held, bucket, last = [], 0, 0
            for unit, total in zip(units, arrived):
                new, last, reduced = total - last, total, 0
                if new and bucket + new > size and bucket:  # reduce_independent_p_g_buckets_and_remove_grads
                    reduced, bucket = bucket, 0
                bucket += new
                held.append(low * (unit + prefetch + 2 * reduced))
            return held

        return MemoryLayout(low * (part + small), accum * part, mom + master, low * bucket,
                            low * (counts.largest_unit + prefetch + 2 * min(size, n)), 0.0, 1 / world_size,
                            gathered_forward=2 * low * live, gathered_backward=backward)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def zero_grad(self) -> None:
        pass  # DeepSpeed's step() already cleared the gradients (ZeRO owns the gradient buffers)

    # ------------------------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> Dict[str, Any]:
        return {"engine": self.name, "world_size": self.world_size, "zero_stage": self.stage,
                "precision": "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"}

    def save(self, directory: str, tag: str, client_state: Dict[str, Any], final: bool = False) -> str:
        path = os.path.join(directory, tag)
        broadcast_buffers(self.module)
        self.ds.save_checkpoint(directory, tag=tag, client_state={"scaleclr": client_state,
                                                                  "scaleclr_meta": self.checkpoint_meta()},
                                save_latest=False)
        self._fsync_own_files(path)
        dist.barrier()  # every rank's files are durable before the meta file marks the checkpoint complete
        if self.rank == 0:
            # + the position, so offline readers (scaleclr.export) know it without unpickling DeepSpeed's files
            meta = {**self.checkpoint_meta(), "train_state": dict(client_state.get("train_state", {}))}
            atomic_write_text(json.dumps(meta, indent=1), os.path.join(path, META_FILE))
        dist.barrier()
        return path

    def _fsync_own_files(self, path: str) -> None:
        """fsync the files this rank wrote (DeepSpeed's torch.save does not): its ZeRO partition
        ``*zero_pp_rank_<rank>_*``; rank 0 also the model states and the directory entries."""
        names = os.listdir(path)
        mine = [n for n in names if f"pp_rank_{self.rank}_" in n]
        if self.rank == 0:
            mine += [n for n in names if n.startswith("mp_rank_")]
        fsync_files(os.path.join(path, n) for n in mine)
        if self.rank == 0:
            fsync_dir(path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))

    def load(self, path: str) -> Dict[str, Any]:
        directory, tag = os.path.split(os.path.normpath(path))
        meta_path = os.path.join(path, META_FILE)
        if not os.path.exists(meta_path):
            raise ValueError(f"{path} is not a scaleclr DeepSpeed checkpoint (no {META_FILE}); the last save "
                             "may have been interrupted: delete it, or point config.CHECKPOINT.DIR elsewhere.")
        with open(meta_path) as f:
            meta = json.load(f)
        now = self.checkpoint_meta()
        check_resumable(path, meta, now)
        if meta["precision"] != now["precision"]:
            logger.warning("%s was written with %s; resuming with %s (fp32 masters are loaded)", path,
                           meta["precision"], now["precision"])
        load_path, client = self.ds.load_checkpoint(directory, tag=tag, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load {path}")
        if isinstance(self.client, ZeroLARC):
            self.client.bind(self.ds_optimizer)
        return client["scaleclr"]

    # ------------------------------------------------------------------------------------------- export
    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Unsharded fp32 state dict (trunk.*, heads.*) on rank 0: parameters from DeepSpeed's fp32 masters
        (gathered from the ZeRO partitions, one parameter at a time), buffers from the module. Collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.module
        broadcast_buffers(module)
        names = list(module.state_dict(keep_vars=True).keys())  # ZeRO-3: keys with empty placeholders
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        fp16_master = self._stage0_masters() if self.stage == 0 else {}
        out: Dict[str, torch.Tensor] = {}
        for name in names:
            if name in params:
                p = params[name]
                full = None
                if id(p) in fp16_master:
                    full = fp16_master[id(p)]
                elif self.stage >= 1 and p.requires_grad:
                    full = safe_get_full_fp32_param(p)
                if full is None:
                    full = self._gathered(p)
                out[name] = full.detach().float().cpu().view(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            else:
                b = buffers[name]
                out[name] = b.detach().float().cpu() if b.is_floating_point() else b.detach().cpu()
        return out if self.rank == 0 else None

    def _gathered(self, p: nn.Parameter) -> torch.Tensor:
        if hasattr(p, "ds_id"):
            import deepspeed
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().clone()
        return p.detach()

    def _stage0_masters(self) -> Dict[int, torch.Tensor]:
        """bf16/fp16 at ZeRO-0: DeepSpeed's FP16_Optimizer keeps one unpartitioned flat fp32 master per group,
        FP16_UnfusedOptimizer one fp32 master per parameter. ``{id(low-precision param): fp32 master}``."""
        out: Dict[int, torch.Tensor] = {}
        opt = self.ds_optimizer
        lp_groups = getattr(opt, "fp16_groups", None)
        if lp_groups is None:
            return out
        if hasattr(opt, "fp32_groups_flat"):
            layouts = build_flat_layouts(opt)
            for params, flat in zip(lp_groups, opt.fp32_groups_flat):
                for p, (start, numel) in zip(params, layouts[id(flat)].fragments):
                    out[id(p)] = flat.detach().narrow(0, start, numel).view(p.shape)
        elif hasattr(opt, "fp32_groups"):
            for params, masters in zip(lp_groups, opt.fp32_groups):
                for p, m in zip(params, masters):
                    out[id(p)] = m.detach()
        return out


def read_fp32_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], str]:
    """The fp32 SimCLRModel state dict (``trunk.*``, ``heads.*``, BN buffers) of a scaleclr DeepSpeed checkpoint
    directory, any ZeRO stage and any number of ranks, read in one process without a process group or GPU.

    Returns:
        ``(state, meta, tag)``: ``meta`` is ``scaleclr_meta.json`` (``{}`` when absent), ``tag`` the directory name.

    Raises:
        ValueError: a ZeRO-0 bf16/fp16 checkpoint (its fp32 masters sit in the optimizer state).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = os.path.normpath(path)
    directory, tag = os.path.split(path)
    meta_path = os.path.join(path, META_FILE)
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    if meta.get("zero_stage", 1) == 0:
        model_file = os.path.join(path, "mp_rank_00_model_states.pt")
        if meta.get("precision", "fp32") != "fp32":
            raise ValueError(f"{path} is a ZeRO-0 {meta.get('precision')} checkpoint: its module weights are "
                             f"{meta.get('precision')} and the fp32 masters sit in the optimizer state. Use the "
                             "export the final checkpoint writes (<tag>_consolidated_fp32.torch), or resume and "
                             "finish the run to get one.")
        # DeepSpeed's own model-states file (written by this run's engine; it holds non-tensor objects)
        state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, meta, tag
