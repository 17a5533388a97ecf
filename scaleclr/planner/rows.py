"""The planner's rows: every engine x activation checkpointing for one config, the OOM pre-check.

Used by the command line (:mod:`scaleclr.plan`), ``train.py``'s pre-check (``scaleclr.launch.memory_precheck``) and
``benchmarks/gpu_check.py`` (:func:`predict`). See :mod:`scaleclr.plan` for what a row holds.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from scaleclr import builders
from scaleclr.config.validate import transforms_num_views
from scaleclr.distributed.parallelize import batchnorm_params, shard_units
from scaleclr.engines.base import ModelCounts
from scaleclr.planner.model import TRACE_BATCHES, ScaledTrace, max_batch, row_bytes
from scaleclr.planner.trace import trace_optimizer_step, trace_steps

logger = logging.getLogger("scaleclr.plan")

__all__ = ["ROWS", "Planner", "plan", "predict", "memory_check", "MemoryCheckError", "crop_views"]

ROWS = ("ddp", "fsdp", "zero1", "zero2", "zero3")
DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
#: CPU: a factor on the batch-dependent bytes for what a live-tensor count does not see (allocator rounding, oneDNN
#: scratch, late frees). 1: ``benchmarks/plan_accuracy.py`` measures the traced bytes within a few % of the
#: anonymous memory of real steps (benchmarks/RESULTS.md), so no factor is applied.
CPU_OVERHEAD = 1.0
#: CUDA: the caching allocator's rounding is small next to the blocks' sizes; cuDNN's workspace is allowed for
#: separately (the largest single tensor of the step), not by a factor. Not yet checked against a GPU here:
#: ``benchmarks/gpu_check.py`` prints predicted vs ``torch.cuda.max_memory_allocated``.
CUDA_OVERHEAD = 1.0


class MemoryCheckError(RuntimeError):
    """``config.MODEL.MEMORY_CHECK=error`` and the configuration is predicted not to fit."""


def crop_views(c) -> Tuple[List[Tuple[int, int]], bool]:
    """``([(count, side), ...], model gets a list of crops)`` from ``config.DATA.TRAIN.TRANSFORMS``."""
    transforms = list(c.DATA.TRAIN.TRANSFORMS)
    for t in transforms:
        if t.get("name") == "ImgPilToMultiCrop":
            return [(int(n), int(s)) for n, s in zip(t["num_crops"], t["size_crops"])], True
    side = next((t.get("size") for t in transforms if t.get("name") in ("RandomResizedCrop", "CenterCrop",
                                                                         "Resize") and t.get("size")), 224)
    side = int(side[0] if isinstance(side, (list, tuple)) or hasattr(side, "__len__") else side)
    return [(transforms_num_views(transforms), side)], False


def engine_config(c, row: str, world: int, device: torch.device):
    """``(EngineSpec, engine class)`` of ``row`` (ddp | fsdp | zero1-3) for config node ``c``: DeepSpeed rows use
    the config's own JSON when it runs DeepSpeed (stage replaced), else ``ds_configs/zero<k>.json``."""
    c = copy.deepcopy(c)
    if row.startswith("zero"):
        own = c.DISTRIBUTED.ENGINE == "deepspeed"
        c.DISTRIBUTED.ENGINE = "deepspeed"
        if not own:
            c.DISTRIBUTED.DEEPSPEED_CONFIG = str(DS_CONFIGS / f"{row}.json")
        from scaleclr.engines.deepspeed import DeepSpeedEngine as cls
    else:
        c.DISTRIBUTED.ENGINE = row
        if row == "fsdp":
            from scaleclr.engines.fsdp import FSDPEngine as cls
        else:
            from scaleclr.engines.ddp import DDPEngine as cls
    spec = builders.build_engine_spec(c, world, device)
    if row.startswith("zero"):
        ds = copy.deepcopy(spec.deepspeed_config)
        ds.setdefault("zero_optimization", {})["stage"] = int(row[-1])
        spec = type(spec)(**{**spec.__dict__, "deepspeed_config": ds})
    return spec, cls


def configured_row(c) -> str:
    """The row name of the config's own engine (``zero<k>`` for DeepSpeed)."""
    if c.DISTRIBUTED.ENGINE != "deepspeed":
        return str(c.DISTRIBUTED.ENGINE)
    from scaleclr.config.deepspeed_json import build_deepspeed_config
    ds = build_deepspeed_config(c, c.DISTRIBUTED.NUM_NODES * c.DISTRIBUTED.NUM_PROC_PER_NODE)
    return f"zero{int(ds.get('zero_optimization', {}).get('stage', 0))}"


class Planner:
    """Traces (cached per precision x checkpointing) and engine layouts for one config."""

    def __init__(self, root, device_type: str = "cuda", world: Optional[int] = None):
        self.c = root.config
        d = self.c.DISTRIBUTED
        self.world = world or d.NUM_NODES * d.NUM_PROC_PER_NODE
        self.device = torch.device(device_type)
        self.batch = int(self.c.DATA.TRAIN.BATCHSIZE_PER_REPLICA)
        self.views, self.as_list = crop_views(self.c)
        self._traces: Dict[Any, ScaledTrace] = {}
        self._step: Optional[int] = None
        self.counts = self._counts()

    def _counts(self) -> ModelCounts:
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            model = builders.build_model(self.c, init_weights=False)
            params = [p for p in model.parameters() if p.requires_grad]
            units = shard_units(model, "block") + [model]
            owned = {id(p) for u in units[:-1] for p in u.parameters()}
            root_numel = sum(p.numel() for p in params if id(p) not in owned)
            largest = max([sum(p.numel() for p in u.parameters()) for u in units[:-1]] + [root_numel])
            return ModelCounts(numel=sum(p.numel() for p in params),
                               replicated=sum(p.numel() for p in batchnorm_params(model) if p.requires_grad),
                               sizes=tuple(p.numel() for p in params), largest_unit=largest,
                               momentum=float(self.c.OPTIMIZER.momentum) > 0)

    def scaleclr_sync_bn(self) -> bool:
        """The trainer converts to scaleclr's SyncBatchNorm (world > 1; ``native``, or ``pytorch`` on CPU, where
        torch's runs on GPU tensors only). torch's and apex's CUDA SyncBN are traced as BatchNorm (fused kernels)."""
        sbn = self.c.MODEL.SYNC_BN_CONFIG
        return bool(sbn.CONVERT_BN_TO_SYNC_BN) and self.world > 1 and (
            sbn.SYNC_BN_TYPE == "native" or (sbn.SYNC_BN_TYPE == "pytorch" and self.device.type == "cpu"))

    def step_transient(self) -> int:
        """The optimizer step's temporaries (traced once: they depend on the parameters only)."""
        if self._step is None:
            self._step = trace_optimizer_step(lambda: builders.build_model(self.c, init_weights=False),
                                              builders.make_optimizer_factory(self.c))
        return self._step

    def trace(self, spec) -> ScaledTrace:
        p = spec.precision
        key = (p.autocast_dtype, p.channels_last, spec.activation_checkpointing)
        if key not in self._traces:
            c = copy.deepcopy(self.c)
            lc = c.LOSS[c.LOSS.name]
            if "impl" in lc:  # resolved for the planned device and batch (auto: reference or streaming)
                from scaleclr.losses import resolve_impl
                rows = sum(n for n, _ in self.views) * self.batch
                impl = resolve_impl(lc.impl, torch.device("cpu"), rows, rows * self.world)
                lc.impl = "streaming" if lc.impl == "auto" and self.device.type == "cuda" and \
                    impl == "triton" else impl
            batches = TRACE_BATCHES[3 if lc.get("impl", "reference") == "reference" else 2]
            traces = trace_steps(lambda: builders.build_model(c, init_weights=False), lambda: builders.build_loss(c),
                                 self.views, batches, world=self.world, autocast_dtype=p.autocast_dtype,
                                 channels_last=p.channels_last, activation_checkpointing=key[2],
                                 as_list=self.as_list, sync_bn=self.scaleclr_sync_bn())
            self._traces[key] = ScaledTrace(traces, batches, self.step_transient())
        return self._traces[key]

    def row(self, engine: str, checkpointing: bool, gpu_memory: Optional[int], batch: Optional[int] = None
            ) -> Dict[str, Any]:
        c = copy.deepcopy(self.c)
        c.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING = checkpointing
        spec, cls = engine_config(c, engine, self.world, self.device)
        layout = cls.memory_layout(spec, self.world, self.counts)
        trace = self.trace(spec)
        cuda = self.device.type == "cuda"
        ws = (lambda b: trace.largest(b)) if cuda else (lambda b: 0)
        kw = dict(workspace=ws, overhead=CUDA_OVERHEAD if cuda else CPU_OVERHEAD)
        b = batch or self.batch
        parts = row_bytes(layout, trace, b, **kw)
        fits = None if gpu_memory is None else parts["peak"] <= gpu_memory
        top = None if gpu_memory is None else max_batch(lambda k: row_bytes(layout, trace, k, **kw)["peak"]
                                                        <= gpu_memory)
        return {"engine": engine, "activation_checkpointing": checkpointing, "batch_per_gpu": b,
                "peak_bytes": parts["peak"], "fits": fits, "max_batch_per_gpu": top,
                **{f"{k}_bytes": v for k, v in parts.items() if k != "peak"}}


def plan(root, device_type: str = "cuda", gpu_memory: Optional[int] = None,
         engines: Sequence[str] = ROWS) -> Dict[str, Any]:
    """Every engine x checkpointing row for the composed config ``root`` (see the module docstring)."""
    pl = Planner(root, device_type)
    rows = [pl.row(e, ac, gpu_memory) for e in engines for ac in (False, True)]
    return {"device": device_type, "gpu_memory_bytes": gpu_memory, "world_size": pl.world,
            "views": [list(v) for v in pl.views], "parameters": pl.counts.numel, "rows": rows}


def predict(root, engine: Optional[str] = None, checkpointing: Optional[bool] = None, device_type: str = "cuda",
            gpu_memory: Optional[int] = None, world: Optional[int] = None) -> Dict[str, Any]:
    """One row: ``engine`` (default: the config's), ``checkpointing`` (default: the config's). For
    ``benchmarks/gpu_check.py``: compare ``peak_bytes`` with ``torch.cuda.max_memory_allocated``."""
    c = root.config
    engine = engine or configured_row(c)
    if checkpointing is None:
        checkpointing = bool(c.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING)
    return Planner(root, device_type, world).row(engine, checkpointing, gpu_memory)


def memory_check(root, device: torch.device, total_memory: Optional[int] = None,
                 planner: Optional[Planner] = None) -> Optional[Dict[str, Any]]:
    """``config.MODEL.MEMORY_CHECK`` for this run on ``device`` (CUDA only; ``total_memory`` default: the
    device's). Logs the prediction; when it does not fit, names an engine / checkpointing / batch that does,
    logs it (``warn``) or raises :class:`MemoryCheckError` (``error``). Returns the row, None when skipped.
    ``planner``: a CUDA :class:`Planner` of the same model, crops and batch, to reuse its traces."""
    c = root.config
    mode = str(c.MODEL.MEMORY_CHECK)
    if mode == "off" or device.type != "cuda":
        return None
    total = total_memory or torch.cuda.get_device_properties(device).total_memory
    pl = planner or Planner(root, "cuda")
    engine, ac = configured_row(c), bool(c.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING)
    row = pl.row(engine, ac, total)
    logger.info("memory plan: %s, activation checkpointing %s, %d images per GPU: predicted peak %.2f GiB of "
                "%.2f GiB", engine, "on" if ac else "off", pl.batch, row["peak_bytes"] / 2 ** 30, total / 2 ** 30)
    if row["fits"]:
        return row
    msg = (f"predicted out of memory: {engine} with activation checkpointing {'on' if ac else 'off'} at "
           f"{pl.batch} images per GPU needs {row['peak_bytes'] / 2 ** 30:.2f} GiB, the GPU has "
           f"{total / 2 ** 30:.2f} GiB. {suggest(pl, engine, ac, total, row)} "
           "(python -m scaleclr.plan with the same arguments prints every option; "
           "config.MODEL.MEMORY_CHECK=off skips this check)")
    if mode == "error":
        raise MemoryCheckError(msg)
    logger.warning("%s", msg)
    return row


def suggest(pl: Planner, engine: str, ac: bool, total: int, row: Dict[str, Any]) -> str:
    """The least change that fits: checkpointing on, then another engine, else the largest batch."""
    tried = [(engine, True)] + [(e, a) for a in (ac, True) for e in ROWS if e != engine]
    for e, a in tried:
        if pl.row(e, a, total)["fits"]:
            keys = [f"config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING={a}"]
            if e != engine:
                keys.insert(0, "config.DISTRIBUTED.ENGINE=" + (
                    f"deepspeed config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/{e}.json" if e.startswith("zero")
                    else e))
            return f"Fits: {e} with activation checkpointing {'on' if a else 'off'} ({' '.join(keys)})."
    if row["max_batch_per_gpu"]:
        return (f"Fits: {engine} at {row['max_batch_per_gpu']} images per GPU "
                f"(config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={row['max_batch_per_gpu']}).")
    return "No engine fits even one image per GPU: use a smaller model or smaller crops."
