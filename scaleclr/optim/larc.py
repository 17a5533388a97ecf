"""LARC (layer-wise adaptive rate control) wrapper with NVIDIA apex's exact semantics (spec 5.2).

SimCLR trains with LARS (You et al. 2017, arXiv 1708.03888) at batch sizes up to 8192 (Chen et al. 2020,
arXiv 2002.05709, Sec. 2.2 "Training with large batch size"). VISSL reproduces it with SGD + apex
``LARC`` in *scale* mode (``clip=False``, trust coefficient 0.001, eps 1e-8). For every param group with
learning rate ``lr`` and weight decay ``wd`` and every parameter ``p`` with a gradient ``g``::

    pn, gn = ||p||_2, ||g||_2                      # whole tensors, raw gradient
    if pn != 0 and gn != 0:
        local = tc * pn / (gn + wd * pn + eps)
        if clip: local = min(local / lr, 1)        # effective lr = min(lr, trust lr)
        g <- (g + wd * p) * local                  # weight decay folded in before scaling
    else:                                          # zero parameter or zero gradient:
        g unchanged, no weight decay               # plain SGD step
    inner optimizer step with the group's weight_decay temporarily 0

Groups flagged ``larc_exclude=True`` (see :func:`scaleclr.optim.build_param_groups` with
``exclude_bias_and_norm``) are not touched: the inner optimizer applies their ``weight_decay`` as usual.

Sharded parameters: norms must be of the *full* tensors. Engines inject ``norm_fn`` (e.g. one all-reduce
of squared local norms for FSDP DTensor shards or ZeRO partitions); LARC calls it once per step on the
concatenated list ``params + grads`` so a sharded implementation needs a single collective. The
adaptation itself is element-wise, works on local shards and never reads a value on the host.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["LARC", "local_norms"]

NormFn = Callable[[Sequence[torch.Tensor]], torch.Tensor]
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_HYPERPARAMETERS = ("trust_coefficient", "clip", "eps")


def local_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of every tensor, computed with ``torch._foreach_norm`` (one kernel per device/dtype group).

    Half-precision tensors are accumulated in float32. Only valid for unsharded tensors; a sharded tensor
    (one with ``to_local``, such as ``DTensor``) is rejected because its local norm would not be the full norm.
    Other subclasses (e.g. the fake tensors of tests/fake_cuda.py) hold whole tensors and are accepted.

    Args:
        tensors: ``n`` tensors of any shapes.

    Returns:
        Shape ``[n]``, dtype float32 (float64 if any input is float64), on the first tensor's device.

    Raises:
        TypeError: a sharded tensor (inject a sharding-aware ``norm_fn`` instead).
    """
    if len(tensors) == 0:
        return torch.zeros(0)
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if _is_sharded(t):
            raise TypeError(f"LARC's default norm_fn only handles unsharded tensors, got {type(t).__name__}; "
                            "pass a sharding-aware norm_fn")
        groups[(t.device, t.dtype)].append(i)
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    for (_, dtype), idx in groups.items():
        detached = [tensors[i].detach() for i in idx]
        if dtype in (torch.float32, torch.float64):
            norms = torch._foreach_norm(detached)
        else:
            norms = torch._foreach_norm(detached, 2, dtype=torch.float32)
        for i, n in zip(idx, norms):
            out[i] = n
    device = tensors[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in out) else torch.float32
    return torch.stack([n.to(device=device, dtype=dtype) for n in out])


class LARC(torch.optim.Optimizer):
    """Wraps a torch optimizer (SGD in SimCLR) and rescales gradients layer-wise before its step.

    Drop-in for the wrapped optimizer: ``param_groups``, ``state`` and ``defaults`` are the inner
    optimizer's (shared objects, so LR schedulers writing ``param_groups[i]["lr"]`` work), and ``step``,
    ``zero_grad``, ``state_dict``, ``load_state_dict`` and ``add_param_group`` delegate to it. It subclasses
    ``torch.optim.Optimizer`` only so that ``isinstance`` checks (DeepSpeed, ``GradScaler``) accept it; no
    state lives in the base class. Step/state-dict hooks are registered on the inner optimizer.

    Args:
        optimizer: the inner optimizer (e.g. ``torch.optim.SGD``); groups may carry ``larc_exclude``.
        trust_coefficient: ``tc`` above (VISSL SimCLR: 0.001).
        clip: clip mode (``local = min(local / lr, 1)``) instead of scale mode.
        eps: added to the denominator of the trust ratio.
        norm_fn: ``norm_fn(tensors) -> Tensor[len(tensors)]`` giving the full L2 norm of every tensor;
            default :func:`local_norms`. Called at most once per :meth:`step`, on ``params + grads``.

    Raises:
        ValueError: non-positive trust coefficient or negative eps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.001, clip: bool = False,
                 eps: float = 1e-8, norm_fn: Optional[NormFn] = None) -> None:
        # Deliberately no super().__init__(): parameters and state belong to the inner optimizer.
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "step"):
            raise ValueError(f"LARC wraps a torch optimizer, got {type(optimizer).__name__}")
        _check_hyperparameters(trust_coefficient, eps)
        self.optim = optimizer
        self.trust_coefficient = float(trust_coefficient)
        self.clip = bool(clip)
        self.eps = float(eps)
        self.norm_fn: NormFn = norm_fn if norm_fn is not None else local_norms
        self._last: Optional[Tuple[List[Any], torch.Tensor, torch.Tensor]] = None  # keys, factors, adapted

    # ------------------------------------------------------------------ delegation to the inner optimizer
    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's param groups (same list object)."""
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optim.param_groups = value

    @property
    def state(self) -> Dict[torch.Tensor, Any]:  # type: ignore[override]
        """The inner optimizer's per-parameter state (e.g. SGD ``momentum_buffer``)."""
        return self.optim.state

    @state.setter
    def state(self, value: Dict[torch.Tensor, Any]) -> None:
        self.optim.state = value

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.optim.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.optim.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears gradients of all parameters (delegates to the inner optimizer)."""
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a param group to the inner optimizer (``larc_exclude`` is honoured)."""
        self.optim.add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        """The inner optimizer's state dict plus a ``"larc"`` entry with the LARC hyperparameters.

        Keeping the inner layout (``state``/``param_groups`` at the top level) lets tools that rewrite
        optimizer state dicts (``torch.distributed.checkpoint``, DeepSpeed) handle it like any optimizer's.
        """
        sd = dict(self.optim.state_dict())
        sd["larc"] = {k: getattr(self, k) for k in _HYPERPARAMETERS}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a dict produced by :meth:`state_dict` (or a plain inner-optimizer state dict).

        Raises:
            ValueError: malformed ``"larc"`` entry.
        """
        sd = dict(state_dict)
        larc = sd.pop("larc", None)
        if larc is not None:
            unknown = sorted(set(larc) - set(_HYPERPARAMETERS))
            if unknown:
                raise ValueError(f"Unknown LARC state keys {unknown}; expected {list(_HYPERPARAMETERS)}")
            _check_hyperparameters(larc.get("trust_coefficient", self.trust_coefficient),
                                   larc.get("eps", self.eps))
            self.trust_coefficient = float(larc.get("trust_coefficient", self.trust_coefficient))
            self.clip = bool(larc.get("clip", self.clip))
            self.eps = float(larc.get("eps", self.eps))
        self.optim.load_state_dict(sd)

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, eps={self.eps})"
                f" wrapping {self.optim!r}")

    # -------------------------------------------------------------------------------------- LARC step
    def trust_ratios(self) -> Dict[torch.Tensor, float]:
        """The ``local`` factors of the last :meth:`step`, keyed by parameter (reads them on the host).

        Only adapted parameters appear (not ``larc_exclude`` groups, parameters without gradient, or
        zero-norm parameters / zero gradients).
        """
        if self._last is None:
            return {}
        keys, factors, adapt = self._last
        return {k: f for k, f, a in zip(keys, factors.tolist(), adapt.tolist()) if a}

    def _entry_keys(self, entries: List[Tuple[torch.Tensor, float, Any]]) -> List[Any]:
        """What :meth:`trust_ratios` is keyed by, one per entry (sharded subclasses: the original parameter)."""
        return [e[0] for e in entries]

    @torch.no_grad()
    def _adapt_gradients(self, entries: List[Tuple[torch.Tensor, float, Any]]) -> None:
        """Applies the LARC gradient transform to ``(param, weight_decay, lr)`` entries in place.

        No host synchronisation and no host-to-device copy: the trust ratios stay on the device and reach the
        gradients as 0-d tensors (``g <- (g + wd_eff * p) * factor`` with ``factor = 1, wd_eff = 0`` where LARC
        does not adapt), and the per-entry weight decays and learning rates (host floats, the LR changing every
        step under a schedule) become device vectors through fill kernels (``torch.full``, the value passed as a
        kernel argument), one per run of consecutive entries sharing them; selections are slices of those runs,
        never index lists (which would be copied to the device). So the step can be queued behind the backward
        pass. Works on plain tensors, ``DTensor`` shards (their local tensors are updated) and ZeRO partition
        fragments (views).
        """
        self._last = None
        n = len(entries)
        if n == 0:
            return
        params = [e[0] for e in entries]
        norms = self.norm_fn(params + [p.grad for p in params])
        if tuple(norms.shape) != (2 * n,):
            raise ValueError(f"LARC norm_fn must return shape [{2 * n}], got {tuple(norms.shape)}")
        dtype = torch.promote_types(norms.dtype, torch.float32)
        norms = norms.detach().to(dtype)
        pn, gn = norms[:n], norms[n:]
        runs = _runs([(float(e[1]), float(e[2]) if self.clip else None) for e in entries])
        wd = _filled([(stop - start, key[0]) for start, stop, key in runs], pn)
        local = self.trust_coefficient * pn / (gn + wd * pn + self.eps)
        if self.clip:
            lr = _filled([(stop - start, key[1]) for start, stop, key in runs], pn)
            local = torch.clamp(local / lr, max=1.0)
        adapt = (pn != 0) & (gn != 0)
        factor = torch.where(adapt, local, torch.ones_like(local))
        self._last = (self._entry_keys(entries), factor, adapt)
        grads = [_local(p.grad) for p in params]
        with_wd = [(start, stop) for start, stop, key in runs if key[0] != 0]  # weight decay is known on the host
        if with_wd:
            wd_eff = torch.where(adapt, wd, torch.zeros_like(wd))
            wd_scalars = _scalars(wd_eff, grads[with_wd[0][0]])
            sel = [i for start, stop in with_wd for i in range(start, stop)]
            torch._foreach_add_([grads[i] for i in sel], torch._foreach_mul(
                [_local(params[i]) for i in sel], [wd_scalars[i] for i in sel]))
        torch._foreach_mul_(grads, _scalars(factor, grads[0]))

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Rescales gradients (apex LARC) and runs the inner optimizer's step.

        Args:
            closure: optional closure re-evaluating the loss; it runs *before* the adaptation (the inner
                step is called without it).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved: List[Tuple[Dict[str, Any], Any]] = []
        entries: List[Tuple[torch.Tensor, float, Any]] = []
        try:
            for group in self.optim.param_groups:
                if group.get("larc_exclude", False):
                    continue
                weight_decay = group.get("weight_decay", 0.0)
                saved.append((group, weight_decay))
                group["weight_decay"] = 0.0  # folded into the adapted gradient instead (apex)
                entries.extend(self._group_entries(group, weight_decay))
            self._adapt_gradients(entries)
            self.optim.step()
        finally:
            for group, weight_decay in saved:
                group["weight_decay"] = weight_decay
            self._finish_step()
        return loss

    def _group_entries(self, group: Dict[str, Any], weight_decay: float
                       ) -> List[Tuple[torch.Tensor, float, Any]]:
        """(tensor with .grad, weight decay, lr) for every tensor of `group` LARC adapts. Sharded
        subclasses return per-parameter fragments of flat partitions instead."""
        return [(p, weight_decay, group["lr"]) for p in group["params"] if p.grad is not None]

    def _finish_step(self) -> None:
        """Called after every step (also on error); subclasses release per-step bookkeeping here."""


def _is_sharded(t: torch.Tensor) -> bool:
    """A tensor subclass holding a shard (``DTensor``: ``to_local``)."""
    return hasattr(t, "to_local") and type(t) not in _PLAIN_TENSOR_TYPES


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (updated in place), or ``t`` itself."""
    return t.to_local() if _is_sharded(t) else t


def _runs(keys: List[Any]) -> List[Tuple[int, int, Any]]:
    """``(start, stop, key)`` of every run of consecutive equal ``keys`` (host-side bookkeeping)."""
    runs: List[Tuple[int, int, Any]] = []
    for i, key in enumerate(keys):
        if runs and runs[-1][2] == key:
            runs[-1] = (runs[-1][0], i + 1, key)
        else:
            runs.append((i, i + 1, key))
    return runs


def _filled(counts_values: List[Tuple[int, float]], like: torch.Tensor) -> torch.Tensor:
    """``[sum(counts)]`` vector holding each ``value`` ``count`` times, in ``like``'s dtype and device, made by fill
    kernels (``torch.full``), not by copying a host-built tensor to the device."""
    parts = [torch.full((count,), value, dtype=like.dtype, device=like.device) for count, value in counts_values]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scalars(values: torch.Tensor, like: torch.Tensor) -> List[torch.Tensor]:
    """``values`` ([n]) as n 0-d tensors in ``like``'s dtype and device (foreach operands, no host sync)."""
    return list(values.to(device=like.device, dtype=like.dtype).unbind())


def _check_hyperparameters(trust_coefficient: float, eps: float) -> None:
    if not trust_coefficient > 0:
        raise ValueError(f"LARC trust_coefficient must be > 0, got {trust_coefficient}")
    if not eps >= 0:
        raise ValueError(f"LARC eps must be >= 0, got {eps}")


def _forward_hook_registration(name: str) -> Callable[..., Any]:
    def method(self: LARC, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.optim, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Registers the hook on the wrapped optimizer (``self.optim.{name}``)."
    return method


for _name in ("register_step_pre_hook", "register_step_post_hook", "register_state_dict_pre_hook",
              "register_state_dict_post_hook", "register_load_state_dict_pre_hook",
              "register_load_state_dict_post_hook"):
    setattr(LARC, _name, _forward_hook_registration(_name))
del _name
