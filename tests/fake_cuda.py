"""CUDA checks on a CPU: the one helper owning the fake-CUDA machinery (DESIGN.md, "CUDA checks on a CPU").

Two pieces:

* :func:`fake_cuda` enters a ``FakeTensorMode`` in which ``torch.empty(..., device="cuda")`` (and modules built
  under ``torch.device("cuda")``, see :func:`fake_module`) give fake tensors on ``cuda:0``: shapes, dtypes,
  strides and devices are propagated by the meta kernels, no value exists and no CUDA runtime is needed.
* :class:`SyncRecorder`, a ``TorchDispatchMode`` that sees every aten op on its way to the fake (or meta)
  kernels and records what would stall or break a real GPU step:

  ``h2d``            a host-to-device copy (``_to_copy`` / ``copy_`` from a CPU tensor): in a steady-state
                     step it is a tensor built on the host every step (``torch.tensor(list, device=...)``,
                     indexing with a Python list), a blocking copy from pageable memory;
  ``host_read``      a device value read on the host (``.item()``, ``int()``, ``bool()``, ``.tolist()``,
                     ``.cpu()``: ``_local_scalar_dense``, a device-to-host copy, ``equal``, ``is_nonzero``),
                     which waits for all queued work;
  ``data_dependent`` an op whose output shape depends on device values (``nonzero``, ``masked_select``,
                     boolean indexing, ``unique``): also a synchronisation;
  ``mixed_devices``  a CPU tensor (other than a 0-d scalar, which CUDA accepts) as an operand of device work;
  ``pageable_async`` a ``non_blocking`` host-to-device copy from pageable (not page-locked) memory: a blocking
                     copy in disguise (nothing can be pinned without CUDA, so on a CPU any such copy counts);
  ``integer_conv``   a convolution whose input is not floating point (uint8 images that skipped the device
                     stage) or whose input and weight dtypes differ.

  The recorder takes a device type: ``"cuda"`` on fake CUDA, ``"meta"`` where the autograd backward must run
  (it does not on fake CUDA), with the same rules for meta tensors.

:func:`trace` runs a function under the recorder and returns the events. A fake tensor has no value, so a
host read cannot continue: the fake mode raises right after the recorder noted the read (and raises on mixed
devices too); :func:`trace` then returns the events with the exception kept in ``SyncRecorder.error``. An
exception with nothing recorded is a real error and propagates.

Usage::

    with fake_cuda():
        model = fake_module(lambda: build_model())
        x = torch.randn(8, 3, 32, 32, device="cuda")
        assert trace(lambda: model(x)) == []
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

_COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
_HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                   aten.unique_consecutive.default, aten.nonzero_static.default}
_CONVOLUTIONS = {aten.convolution.default, aten._convolution.default, aten.cudnn_convolution.default}
_IGNORED = {torch.ops.prim.device.default, aten.lift_fresh.default, aten.detach.default}


@dataclass(frozen=True)
class Event:
    """One recorded problem: its ``kind`` (see the module docstring), the aten op and a description."""

    kind: str
    op: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} ({self.detail})"


def _describe(t: torch.Tensor) -> str:
    return f"{t.device.type} {str(t.dtype).replace('torch.', '')}{list(t.shape)}"


class SyncRecorder(TorchDispatchMode):
    """Records host synchronisations, host-to-device copies, device mixing and integer convolutions of
    ``device_type`` work (see the module docstring); ``events`` in order of occurrence."""

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type
        self.events: List[Event] = []
        self.error: Optional[BaseException] = None

    def _note(self, kind: str, func: Any, detail: str) -> None:
        self.events.append(Event(kind, str(func), detail))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _IGNORED:
            self._check(func, args, kwargs)
        return func(*args, **kwargs)

    def _on_device(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == self.device_type

    def _check(self, func, args, kwargs) -> None:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in _COPIES:
            src = args[1] if func in (aten.copy_.default, aten.copy.default) else args[0]
            dst_device = (args[0].device if func in (aten.copy_.default, aten.copy.default)
                          else kwargs.get("device") or src.device)
            dst_type = torch.device(dst_device).type
            if src.device.type == "cpu" and dst_type == self.device_type:
                self._note("h2d", func, f"{_describe(src)} -> {dst_type}")
                if kwargs.get("non_blocking", False) and not src.is_pinned():
                    self._note("pageable_async", func, f"non_blocking copy of pageable {_describe(src)}")
            elif src.device.type == self.device_type and dst_type == "cpu":
                self._note("host_read", func, f"{_describe(src)} -> cpu")
            return
        if func in _HOST_READS and any(self._on_device(t) for t in tensors):
            self._note("host_read", func, ", ".join(_describe(t) for t in tensors))
        if func in _DATA_DEPENDENT and any(self._on_device(t) for t in tensors):
            self._note("data_dependent", func, _describe(tensors[0]))
        if func is aten.index.Tensor and any(self._on_device(t) and t.dtype == torch.bool for t in tensors[1:]):
            self._note("data_dependent", func, "boolean index")
        if func in _CONVOLUTIONS and self._on_device(args[0]):
            x, w = args[0], args[1]
            if not (x.is_floating_point() and w.is_floating_point()) or x.dtype != w.dtype:
                self._note("integer_conv", func, f"input {_describe(x)}, weight {_describe(w)}")
        if any(self._on_device(t) for t in tensors):
            for t in tensors:
                if t.device.type == "cpu" and t.dim() > 0:
                    self._note("mixed_devices", func, f"cpu operand {_describe(t)}")


def trace(fn: Callable[[], Any], device_type: str = "cuda") -> List[Event]:
    """Runs ``fn()`` under a :class:`SyncRecorder` and returns what it recorded (see the module docstring for
    exceptions after a recorded event)."""
    recorder = SyncRecorder(device_type)
    try:
        with recorder:
            fn()
    except Exception as e:  # noqa: BLE001 - a fake tensor cannot go on after a recorded host read / mixing
        if not recorder.events:
            raise
        recorder.error = e
    return recorder.events


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A ``FakeTensorMode`` in which ``device="cuda"`` works without CUDA; real CPU tensors may enter it."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def fake_module(build: Callable[[], torch.nn.Module], device: str = "cuda") -> torch.nn.Module:
    """``build()`` with its parameters and buffers created on ``device`` (call inside :func:`fake_cuda` for
    ``cuda``; ``meta`` works anywhere). Building in place avoids ``Module.to``, which cannot swap a real
    parameter for a fake one."""
    with torch.device(device):
        return build()


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """``model.to(memory_format=torch.channels_last)`` for a fake model (``Module.to`` would try to swap the
    fake parameters, which the fake mode's weak references forbid): 4-d parameters and buffers re-laid NHWC."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """``torch.autocast("cuda", dtype)`` on a machine without CUDA (torch would disable it with a warning):
    the autocast dispatch key casts the ops' inputs before they reach the fake kernels and the recorder."""
    with mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        ctx = torch.autocast("cuda", dtype=dtype)
    with ctx:
        yield
