"""One training step traced on fake tensors: which bytes are live, when.

The step (device-stage output -> SimCLR forward under the precision policy -> the configured InfoNCE loss ->
backward -> SGD(+LARC) step) runs under ``FakeTensorMode`` on the CPU device (autocast and autograd work there;
no memory is allocated) with :class:`LiveBytes`, a ``TorchDispatchMode`` that sees every tensor an operator
creates and keeps, per storage, its size in bytes until the storage is garbage collected. The result is a
timeline of allocations and frees, from which :class:`StepTrace` reads

* ``saved``: bytes live at the end of the forward + loss (activations saved for backward, the embedding, the
  input batch; the loss's own share in ``loss_saved``);
* the backward's timeline as points ``(activation bytes, gradient bytes, unit)`` taken after every allocation,
  so an engine that keeps only a fraction of the full-size gradients during backward can be evaluated without a
  second trace (``peak(grad_fraction)``), and one whose backward holds what the running unit needs (ZeRO-3:
  its gathered parameters, its gradient bucket) knows, at every point, that unit and the gradients arrived so
  far: ``unit`` = parameters of the unit of the latest gradient (a residual block or a head, as
  ``shard_units(model, "block")`` cuts them; the stem's modules one by one);
* (:func:`trace_optimizer_step`, once per config) the largest temporaries of the optimizer step over the live
  state (SGD's foreach temporaries, LARC's norms).

Parameters and buffers are created before tracing starts and are not counted here: the engines' layouts count
them (:mod:`scaleclr.planner.states`). Activation checkpointing is applied with the engines' own function
(:func:`scaleclr.distributed.parallelize.apply_activation_checkpointing`), so the recomputation in backward is
traced as it runs. For a data-parallel world ``W`` the loss's all-gather is replaced by a same-size
concatenation (its output ``[W*N, D]`` is what the gather allocates), so the reference loss's ``N x W*N``
logits are counted at their true size.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["LiveBytes", "StepTrace", "trace_steps", "trace_optimizer_step"]


class LiveBytes(TorchDispatchMode):
    """Records every storage an operator creates: ``events`` = ``[(storage id, +bytes | -bytes)]`` in order.

    Views and in-place results share their input's storage and are not counted twice. A storage's bytes are
    its ``nbytes()`` (what an allocator is asked for, before rounding).
    """

    def __init__(self):
        super().__init__()
        self.events: List[Tuple[int, int]] = []
        self._seen = WeakIdKeyDictionary()
        self._next = 0
        self.live = 0
        self.peak = 0

    def exclude(self, tensors) -> None:
        """Storages that exist before tracing (parameters, buffers): never counted, views of them included."""
        for t in tensors:
            self._seen[t.untyped_storage()] = -1

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        sid, n = self._next, st.nbytes()
        self._next += 1
        self._seen[st] = sid
        self.events.append((sid, n))
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, sid, n)

    def _free(self, sid: int, n: int) -> None:
        self.events.append((sid, -n))
        self.live -= n

    def sid(self, t: torch.Tensor) -> Optional[int]:
        return self._seen.get(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@dataclass
class StepTrace:
    """Bytes of one traced step (parameters, buffers and optimizer state excluded).

    Attributes:
        saved: live at the end of forward + loss (saved activations, embedding, input views).
        loss_saved: the loss's part of ``saved`` (logits or streaming buffers, normalised embeddings).
        forward_peak: largest live total during forward + loss.
        points: backward timeline, ``(activation bytes, full-size fp32 gradient bytes, parameters of the running
            unit)`` after every allocation.
        grad_bytes: all parameters' gradients (fp32, unsharded).
        largest: the largest single allocation of forward and backward.
    """

    saved: int
    loss_saved: int
    forward_peak: int
    points: List[Tuple[int, int, int]] = field(default_factory=list)
    grad_bytes: int = 0
    largest: int = 0

    def peak(self, grad_fraction: float = 1.0) -> int:
        """Largest ``activations + grad_fraction x gradients`` over forward and backward."""
        bwd = max((a + grad_fraction * g for a, g, _ in self.points), default=0)
        return int(max(self.forward_peak, bwd))


def _fake_gather(world: int):
    """Stand-ins for ``gather_with_grad`` / ``all_gather_rows`` / ``world_info`` over ``world`` ranks."""
    def gather(x, group=None):
        return torch.cat([x] * world, dim=0)

    return gather, (lambda group=None: (0, world))


def _loss_patches(world: int):
    if world <= 1:
        return contextlib.nullcontext()
    gather, info = _fake_gather(world)
    stack = contextlib.ExitStack()
    for mod, names in (("scaleclr.losses.functional", ("gather_with_grad", "world_info")),
                       ("scaleclr.losses.streaming", ("all_gather_rows", "world_info"))):
        module = __import__(mod, fromlist=["_"])
        for name in names:
            if hasattr(module, name):
                stack.enter_context(mock.patch.object(module, name, info if name == "world_info" else gather))
    return stack


def _sync_bn_patches(world: int):
    """scaleclr's SyncBatchNorm over ``world`` ranks without a process group: local statistics stand in for the
    group's (same shapes: ``(C,)`` and a 0-d count), the backward's ``(2C,)`` all-reduce is skipped."""
    if world <= 1:
        return contextlib.nullcontext()
    from scaleclr.distributed import sync_bn

    def stats(x, group, size):
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x.float() if x.dtype != torch.float32 else x, dim=dims, correction=0)
        n = x.numel() // x.shape[1] * size
        return mean, var * n, torch.tensor(float(n))

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(sync_bn, "world_info", lambda group=None: (0, world)))
    stack.enter_context(mock.patch.object(sync_bn, "_group_batch_stats", stats))
    stack.enter_context(mock.patch.object(sync_bn.dist, "all_reduce", lambda *a, **k: None))
    return stack


def _fake_model(build_model, channels_last: bool, activation_checkpointing: bool, sync_bn: bool = False):
    """The model under the active fake mode, in the layout the engines give it, in train mode; ``sync_bn``: its
    BatchNorms replaced by scaleclr's SyncBatchNorm, as the trainer does for a world > 1 on CPU (whose Python
    backward keeps more temporaries than BatchNorm's fused kernel)."""
    from scaleclr.distributed.parallelize import apply_activation_checkpointing

    model = build_model()
    if sync_bn:
        from scaleclr.distributed.sync_bn import convert_sync_batchnorm
        convert_sync_batchnorm(model, "native")
    if channels_last:  # per tensor (module.to would swap parameters, which fake tensors' weakrefs forbid)
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model.train()


def trace_steps(build_model, build_loss, views: Sequence[Tuple[int, int]], batches: Sequence[int], *,
                world: int, autocast_dtype: Optional[torch.dtype], channels_last: bool,
                activation_checkpointing: bool, as_list: bool = False, sync_bn: bool = False) -> List[StepTrace]:
    """Forward, loss and backward of one training step on fake CPU tensors, once per batch in ``batches`` (one
    fake model for all: the cost of a trace is its operator count, not the batch). The optimizer step is
    traced once, by :func:`trace_optimizer_step`.

    Args:
        build_model: ``() -> SimCLRModel`` (called under fake mode: no real weights).
        build_loss: ``() -> loss module`` taking the ``[V*B, D]`` embedding.
        views: ``(count, side)`` per crop group, e.g. ``[(2, 224)]`` or ``[(2, 160), (4, 96)]``.
        batches: images per rank ``B`` to trace at.
        world: data-parallel ranks (sizes the loss's gathered embedding).
        autocast_dtype: the forward's autocast dtype, None for fp32.
        channels_last: model and inputs NHWC.
        activation_checkpointing: checkpoint every residual block (the engines' function).
        as_list: the model gets a list of crops (multicrop collator) instead of one stacked tensor.
        sync_bn: trace scaleclr's SyncBatchNorm over ``world`` ranks instead of BatchNorm.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from scaleclr.engines.precision import autocast

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cpu = torch.device("cpu")
    out = []
    # real (not fake) index tables the streaming loss caches per shape: real CPU tensors inside the trace
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _fake_model(build_model, channels_last, activation_checkpointing, sync_bn)
        loss_fn = build_loss()
        params = [p for p in model.parameters() if p.requires_grad]
        unit = _units(model)
        dim = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
        for batch in batches:
            with unset_fake_temporarily(), _loss_patches(world):  # fills the streaming loss's index cache
                build_loss()(torch.randn(sum(n for n, _ in views) * batch, dim))
            tracker = LiveBytes()
            tracker.exclude(list(model.parameters()) + list(model.buffers()))
            with tracker, _loss_patches(world), _sync_bn_patches(world if sync_bn else 1):
                if as_list:  # multicrop collator: one [B, 3, s, s] tensor per crop
                    x = [torch.empty(batch, 3, side, side).contiguous(memory_format=fmt)
                         for count, side in views for _ in range(count)]
                else:  # SimCLR collator: the views stacked view-major, [V*B, 3, s, s]
                    (count, side), = views
                    x = torch.empty(count * batch, 3, side, side).contiguous(memory_format=fmt)
                with autocast(cpu, autocast_dtype):
                    emb = model(x)
                before_loss = tracker.live
                loss = loss_fn(emb.float())
                saved, loss_saved, forward_peak = tracker.live, tracker.live - before_loss, tracker.peak
                start = len(tracker.events)
                loss.backward()
                del loss, emb, x
                bwd_events = tracker.events[start:]
                grad_units = {tracker.sid(p.grad): unit[id(p)] for p in params if p.grad is not None}
                for p in params:
                    p.grad = None
            out.append(StepTrace(saved=saved, loss_saved=loss_saved, forward_peak=forward_peak,
                                 points=_replay(saved, bwd_events, grad_units),
                                 grad_bytes=sum(p.numel() * 4 for p in params),
                                 largest=max(n for _, n in tracker.events)))
    return out


def trace_optimizer_step(build_model, make_optimizer) -> int:
    """Bytes the optimizer step (the trainer's SGD(+LARC)) allocates on top of the live parameters, gradients
    and momentum, for the whole unsharded model: its second step, with momentum already allocated (steady)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = _fake_model(build_model, False, False)
        # LARC's norms over fake tensors (its default norm_fn accepts plain tensors only); scalars either way
        opt = make_optimizer(model, norm_fn=lambda ts: torch.stack([t.detach().float().norm() for t in ts]))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # allocates the momentum
        tracker = LiveBytes()
        tracker.exclude(list(model.parameters()) + list(model.buffers()) + [p.grad for p in params] +
                        [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)])
        with tracker:
            opt.step()
        return tracker.peak


def _units(model: torch.nn.Module) -> Dict[int, int]:
    """``id(parameter) -> parameters of its unit``: the residual block or head holding it, else those of its own
    module (the stem's convolution and BatchNorm)."""
    from scaleclr.distributed.parallelize import shard_units

    groups = [list(m.parameters(recurse=False)) for m in model.modules()]  # the units below overwrite theirs
    groups += [list(u.parameters()) for u in shard_units(model, "block")]
    unit = {}
    for own in groups:
        unit.update(dict.fromkeys(map(id, own), sum(p.numel() for p in own)))
    return unit


def _replay(start: int, events: Sequence[Tuple[int, int]], grad_units: Dict[int, int]
            ) -> List[Tuple[int, int, int]]:
    """The backward's points ``(activations, gradients, unit)`` from the tracker's events; ``grad_units``: the
    gradients' storage ids -> their unit's parameters (the unit runs from its first gradient to the next unit's)."""
    act, grad, unit, points = start, 0, 0, []
    for sid, n in events:
        if sid in grad_units:
            grad += n
            unit = grad_units[sid] if n > 0 else unit
        else:
            act += n
        if n > 0:
            points.append((act, grad, unit))
    return points
