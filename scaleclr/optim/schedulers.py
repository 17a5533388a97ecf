"""Parameter schedules as pure functions of training progress, plus VISSL's LR auto-scaling (spec 6).

A schedule maps ``where`` = (optimizer updates done) / (total updates) in ``[0, 1)`` to a value, with
fvcore/ClassyVision semantics (the ones VISSL uses), e.g. SimCLR's linear warmup followed by cosine decay
without restarts (Chen et al. 2020, arXiv 2002.05709, Sec. B.1 / Goyal et al., arXiv 1706.02677):

>>> lr = build_scheduler({"name": "composite", "lengths": [0.1, 0.9], "interval_scaling": ["rescaled", "fixed"],
...                       "schedulers": [{"name": "linear", "start_value": 0.6, "end_value": 4.8},
...                                      {"name": "cosine", "start_value": 4.8, "end_value": 0.0}]})
>>> round(lr(0.5), 6)
2.4

:func:`auto_scale_lr` rewrites a schedule config for the actual global batch size (VISSL's
``infer_learning_rate`` / ``get_scaled_lr_scheduler`` / ``resolve_linear_schedule``).
"""
from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["build_scheduler", "auto_scale_lr", "SCHEDULERS", "ParamScheduler", "ConstantScheduler",
           "LinearScheduler", "CosineScheduler", "MultiStepScheduler", "StepScheduler",
           "StepWithFixedGammaScheduler", "CompositeScheduler"]

#: fvcore's tolerance when comparing ``where`` with segment / step boundaries.
WHERE_EPSILON = 1e-6


class ParamScheduler:
    """Base class: ``scheduler(where) -> float`` for ``where`` in ``[0, 1]``."""

    def __call__(self, where: float) -> float:
        _check_where(where)
        return self._value(where)

    def _value(self, where: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_where(where: float) -> None:
    if not 0.0 <= where <= 1.0:
        raise ValueError(f"schedule position `where` must be in [0, 1], got {where}")


class ConstantScheduler(ParamScheduler):
    """``value`` everywhere."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def _value(self, where: float) -> float:
        return self.value


class LinearScheduler(ParamScheduler):
    """``start_value·(1 − where) + end_value·where``."""

    def __init__(self, start_value: float, end_value: float) -> None:
        self.start_value = float(start_value)
        self.end_value = float(end_value)

    def _value(self, where: float) -> float:
        return self.end_value * where + self.start_value * (1 - where)


class CosineScheduler(ParamScheduler):
    """Half-cosine from ``start_value`` to ``end_value``: ``end + ½(start − end)(1 + cos πt)`` (no restarts)."""

    def __init__(self, start_value: float, end_value: float) -> None:
        self.start_value = float(start_value)
        self.end_value = float(end_value)

    def _value(self, where: float) -> float:
        return self.end_value + 0.5 * (self.start_value - self.end_value) * (1 + math.cos(math.pi * where))


class MultiStepScheduler(ParamScheduler):
    """``values[k]`` between milestones (in epochs), ClassyVision ``multistep`` semantics.

    Args:
        values: ``len(milestones) + 1`` values.
        num_epochs: total epochs (the ``where`` ↦ epoch scale).
        milestones: strictly increasing epochs ``< num_epochs`` where the next value starts; default: equal
            steps of ``ceil(num_epochs / len(values))``.
    """

    def __init__(self, values: Sequence[float], num_epochs: int, milestones: Optional[Sequence[int]] = None) -> None:
        values = [float(v) for v in values]
        num_epochs = int(num_epochs)
        if not values:
            raise ValueError("multistep scheduler needs at least one value")
        if milestones is None:
            width = math.ceil(num_epochs / len(values))
            milestones = [width * (k + 1) for k in range(len(values) - 1)]
        milestones = [int(m) for m in milestones]
        if len(milestones) != len(values) - 1:
            raise ValueError(f"multistep scheduler needs len(values) - 1 = {len(values) - 1} milestones, "
                             f"got {milestones}")
        if num_epochs < len(values):
            raise ValueError(f"multistep scheduler: num_epochs ({num_epochs}) must be >= len(values)")
        previous = 0
        for m in milestones:
            if not previous < m < num_epochs:
                raise ValueError(f"multistep milestones must increase strictly within (0, num_epochs="
                                 f"{num_epochs}), got {milestones}")
            previous = m
        self.values = values
        self.num_epochs = num_epochs
        self.milestones = milestones

    def _value(self, where: float) -> float:
        epoch = int((where + WHERE_EPSILON) * self.num_epochs)
        return self.values[bisect.bisect_right(self.milestones, epoch)]


class StepScheduler(ParamScheduler):
    """``values`` over equal fractions of training (``values[int((where + 1e-6)·len(values))]``)."""

    def __init__(self, values: Sequence[float], num_epochs: Optional[int] = None) -> None:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("step scheduler needs at least one value")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"step scheduler: num_epochs must be > 0, got {num_epochs}")
        self.values = values

    def _value(self, where: float) -> float:
        return self.values[min(int((where + WHERE_EPSILON) * len(self.values)), len(self.values) - 1)]


class StepWithFixedGammaScheduler(StepScheduler):
    """``base_value·gamma^k`` over ``num_decays + 1`` equal fractions of training."""

    def __init__(self, base_value: float, gamma: float, num_decays: int, num_epochs: int) -> None:
        if base_value <= 0 or gamma <= 0 or num_decays <= 0 or num_epochs <= 0:
            raise ValueError("step_with_fixed_gamma needs positive base_value, gamma, num_decays, num_epochs")
        super().__init__([base_value * gamma ** k for k in range(int(num_decays) + 1)], num_epochs)


class CompositeScheduler(ParamScheduler):
    """Schedules run one after the other over fractions ``lengths`` of training (fvcore semantics).

    The active segment is the first ``k`` with ``where + 1e-6 <= lengths[0] + … + lengths[k]`` (else the
    last). ``"rescaled"`` children see ``(where − start_k) / lengths[k]``; ``"fixed"`` children see the
    global ``where`` (so SimCLR's cosine after a 10 % warmup starts at ``cos(0.1π)``, not at its peak).

    Raises:
        ValueError: length mismatch, lengths not summing to 1 (±1e-3), unknown interval scaling.
    """

    def __init__(self, schedulers: Sequence[ParamScheduler], lengths: Sequence[float],
                 interval_scaling: Optional[Sequence[str]] = None) -> None:
        lengths = [float(x) for x in lengths]
        if interval_scaling is None:
            interval_scaling = ["rescaled"] * len(schedulers)
        interval_scaling = [str(s) for s in interval_scaling]
        if not schedulers:
            raise ValueError("composite scheduler needs at least one child scheduler")
        if not len(schedulers) == len(lengths) == len(interval_scaling):
            raise ValueError(f"composite scheduler: {len(schedulers)} schedulers, {len(lengths)} lengths and "
                             f"{len(interval_scaling)} interval_scaling entries must match")
        if abs(sum(lengths) - 1.0) >= 1e-3:
            raise ValueError(f"composite scheduler lengths must sum to 1 (±1e-3), got {lengths} "
                             f"(sum {sum(lengths)})")
        lengths[-1] = 1.0 - sum(lengths[:-1])
        bad = [s for s in interval_scaling if s not in ("rescaled", "fixed")]
        if bad:
            raise ValueError(f"composite interval_scaling must be 'rescaled' or 'fixed', got {bad}")
        self.schedulers = list(schedulers)
        self.lengths = lengths
        self.interval_scaling = interval_scaling

    def _value(self, where: float) -> float:
        k = 0
        end = self.lengths[0]
        while where + WHERE_EPSILON > end and k < len(self.schedulers) - 1:
            k += 1
            end += self.lengths[k]
        child_where = where
        if self.interval_scaling[k] == "rescaled":
            child_where = (where - (end - self.lengths[k])) / self.lengths[k]
            child_where = min(max(child_where, 0.0), 1.0)  # guard float round-off at segment edges
        return self.schedulers[k](child_where)


def _to_plain(obj: Any) -> Any:
    """Deep-copies mappings/sequences (incl. OmegaConf containers) into plain dicts/lists."""
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_to_plain(v) for v in obj]
    return copy.deepcopy(obj)


def _build_composite(cfg: Dict[str, Any], num_epochs: Optional[int]) -> CompositeScheduler:
    children = cfg.get("schedulers")
    if not isinstance(children, list) or not children:
        raise ValueError("composite scheduler needs a non-empty 'schedulers' list")
    return CompositeScheduler([build_scheduler(c, num_epochs=num_epochs) for c in children],
                              cfg.get("lengths", []), cfg.get("interval_scaling"))


#: Scheduler name -> (constructor, required keys, optional keys).
SCHEDULERS: Dict[str, Tuple[Callable[..., ParamScheduler], Tuple[str, ...], Tuple[str, ...]]] = {
    "constant": (ConstantScheduler, ("value",), ()),
    "linear": (LinearScheduler, ("start_value", "end_value"), ()),
    "cosine": (CosineScheduler, ("start_value", "end_value"), ()),
    "multistep": (MultiStepScheduler, ("values", "num_epochs"), ("milestones",)),
    "step": (StepScheduler, ("values",), ("num_epochs",)),
    "step_with_fixed_gamma": (StepWithFixedGammaScheduler, ("base_value", "gamma", "num_decays", "num_epochs"),
                              ()),
    "composite": (_build_composite, ("schedulers", "lengths"), ("interval_scaling",)),
}


def build_scheduler(cfg: Mapping[str, Any], num_epochs: Optional[int] = None) -> ParamScheduler:
    """Builds a schedule from a VISSL ``OPTIMIZER.param_schedulers.<param>`` config.

    Args:
        cfg: mapping with ``name`` and that scheduler's keys: ``constant`` {value}; ``linear`` / ``cosine``
            {start_value, end_value}; ``multistep`` {values, num_epochs, milestones?}; ``step`` {values,
            num_epochs?}; ``step_with_fixed_gamma`` {base_value, gamma, num_decays, num_epochs};
            ``composite`` {schedulers, lengths, interval_scaling? (default all "rescaled")}. Other keys
            (``update_interval``, ``auto_lr_scaling``, keys of other schedulers left over from merged
            defaults) are ignored, as in ClassyVision.
        num_epochs: used where a scheduler needs ``num_epochs`` and the config does not give it
            (VISSL fills it from ``OPTIMIZER.num_epochs``).

    Returns:
        A callable ``where -> float`` for ``where`` in ``[0, 1]``.

    Raises:
        ValueError: unknown name (the message lists the allowed names), missing keys, invalid values.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"scheduler config must be a mapping, got {cfg!r}")
    cfg = _to_plain(cfg)
    name = cfg.get("name")
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown param scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    if num_epochs is not None and cfg.get("num_epochs") is None:
        cfg["num_epochs"] = num_epochs
    ctor, required, optional = SCHEDULERS[name]
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{name} scheduler is missing key(s) {missing}")
    if name == "composite":
        return ctor(cfg, num_epochs)
    return ctor(**{k: cfg[k] for k in required + optional if cfg.get(k) is not None})


# ------------------------------------------------------------------------------------ auto-scaling (6.1)
def _scale_schedule(cfg: Dict[str, Any], scaled_lr: float, warmup_start: float, num_nodes: int,
                    info: Dict[str, Any]) -> None:
    """VISSL ``get_scaled_lr_scheduler`` on a plain-dict schedule, in place."""
    name = cfg.get("name")
    if isinstance(name, str) and "cosine" in name:
        start, end = float(cfg["start_value"]), float(cfg["end_value"])
        if start == 0.0 and end != 0.0:
            raise ValueError(f"cannot auto-scale a cosine schedule with start_value 0 and end_value {end}: "
                             "the decay ratio end/start is undefined")
        ratio = end / start if start != 0.0 else 0.0
        cfg["start_value"] = float(scaled_lr)
        cfg["end_value"] = float(scaled_lr * ratio)
    elif name in ("multistep", "step"):
        values = [float(v) for v in cfg["values"]]
        gamma = round(values[1] / values[0], 6) if len(values) > 1 and values[0] != 0 else 1.0
        cfg["values"] = [round(float(scaled_lr * gamma ** k), 8) for k in range(len(values))]
    elif name == "step_with_fixed_gamma":
        cfg["base_value"] = float(scaled_lr)
    elif name == "linear":
        cfg["end_value"] = float(scaled_lr)
    elif name == "inverse_sqrt":
        cfg["start_value"] = float(scaled_lr)
    elif name == "constant":
        cfg["value"] = float(scaled_lr)
    elif name == "composite":
        children = cfg["schedulers"]
        has_linear = any(c.get("name") == "linear" for c in children)
        for child in children:
            _scale_schedule(child, scaled_lr, warmup_start, num_nodes, info)
        if has_linear:
            _resolve_linear_warmup(cfg, warmup_start, num_nodes, info)
    else:
        raise ValueError(f"cannot auto-scale param scheduler {name!r}; scalable: cosine*, multistep, step, "
                         "step_with_fixed_gamma, linear, inverse_sqrt, constant, composite")


def _resolve_linear_warmup(cfg: Dict[str, Any], warmup_start: float, num_nodes: int,
                           info: Dict[str, Any]) -> None:
    """VISSL ``resolve_linear_schedule``: warmup starts at one machine's LR; dropped when pointless.

    Linear children start at ``warmup_start``. On a single node a linear child with ``start <= end`` is
    removed together with its ``lengths`` / ``interval_scaling`` entries (remaining lengths are renormalised
    to sum to 1). If one child remains, its keys replace the composite (VISSL: a plain schedule over the
    whole run).
    """
    children = cfg["schedulers"]
    n = len(children)
    lengths = list(cfg.get("lengths", [1.0 / n] * n))
    scaling = list(cfg.get("interval_scaling", ["rescaled"] * n))
    keep = []
    for k, child in enumerate(children):
        if child.get("name") == "linear":
            child["start_value"] = float(warmup_start)
            info["warmup_start"] = float(warmup_start)
            info["warmup_end"] = float(child["end_value"])
            if num_nodes == 1 and warmup_start <= float(child["end_value"]):
                info["warmup_removed"] = True
                continue
        keep.append(k)
    if len(keep) == n:
        return
    if not keep:
        raise ValueError("auto-scaling removed every child of the composite LR schedule")
    if len(keep) == 1:
        remaining = children[keep[0]]
        for key in ("schedulers", "lengths", "interval_scaling"):
            cfg.pop(key, None)
        cfg.update(remaining)
        return
    total = sum(float(lengths[k]) for k in keep)
    cfg["schedulers"] = [children[k] for k in keep]
    cfg["lengths"] = [float(lengths[k]) / total for k in keep]
    cfg["interval_scaling"] = [scaling[k] for k in keep]


def auto_scale_lr(lr_cfg: Mapping[str, Any], batch_size_per_replica: int, num_proc_per_node: int,
                  num_nodes: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Scales an LR schedule config to the global batch size (VISSL ``infer_learning_rate``, spec 6.1).

    With ``auto_lr_scaling.auto_scale``: ``global_bs = batch_size_per_replica · num_proc_per_node ·
    num_nodes``; ``factor = global_bs / base_lr_batch_size`` (its square root for ``scaling_type: sqrt``);
    ``scaled = base_value · factor`` (Goyal et al., arXiv 1706.02677; SimCLR uses 0.3 × B/256,
    arXiv 2002.05709 Sec. B.1). Then: cosine → start := scaled, end := scaled·(end/start); linear →
    end := scaled; constant → value := scaled; multistep/step → geometric values from ``scaled`` with the
    ratio ``values[1]/values[0]``; composite → children, then every linear child (warmup) starts at the LR
    of one machine, ``base_value · batch_size_per_replica · num_proc_per_node / base_lr_batch_size``, and
    on a single node a warmup with ``start <= end`` is dropped (see :func:`_resolve_linear_warmup`).

    Args:
        lr_cfg: ``OPTIMIZER.param_schedulers.lr`` (not modified).
        batch_size_per_replica: images per process (``DATA.TRAIN.BATCHSIZE_PER_REPLICA``).
        num_proc_per_node: ``DISTRIBUTED.NUM_PROC_PER_NODE``.
        num_nodes: ``DISTRIBUTED.NUM_NODES``.

    Returns:
        ``(new_cfg, info)``: a new plain-dict config, and what was inferred: ``auto_scale``,
        ``global_batch_size``, ``scaling_type``, ``factor``, ``scaled_lr``, ``warmup_start`` /
        ``warmup_end`` (``None`` without warmup), ``warmup_removed``.

    Raises:
        ValueError: non-positive sizes, missing ``base_value``, unknown ``scaling_type`` or an
            unscalable scheduler.
    """
    cfg = _to_plain(lr_cfg)
    auto = cfg.get("auto_lr_scaling") or {}
    info: Dict[str, Any] = {"auto_scale": bool(auto.get("auto_scale", False)), "warmup_start": None,
                            "warmup_end": None, "warmup_removed": False}
    if not info["auto_scale"]:
        return cfg, info
    for key, value in (("batch_size_per_replica", batch_size_per_replica),
                       ("num_proc_per_node", num_proc_per_node), ("num_nodes", num_nodes)):
        if int(value) != value or value < 1:
            raise ValueError(f"auto LR scaling needs a positive integer {key}, got {value!r}")
    if "base_value" not in auto:
        raise ValueError("auto_lr_scaling.auto_scale is true but auto_lr_scaling.base_value is missing")
    base_value = float(auto["base_value"])
    base_bs = float(auto.get("base_lr_batch_size", 256))
    scaling_type = auto.get("scaling_type", "linear")
    if scaling_type not in ("linear", "sqrt"):
        raise ValueError(f"auto_lr_scaling.scaling_type must be 'linear' or 'sqrt', got {scaling_type!r}")
    if base_bs <= 0:
        raise ValueError(f"auto_lr_scaling.base_lr_batch_size must be > 0, got {base_bs}")
    global_bs = batch_size_per_replica * num_proc_per_node * num_nodes
    factor = global_bs / base_bs
    if scaling_type == "sqrt":
        factor = math.sqrt(factor)
    scaled_lr = base_value * factor
    # Same expression as scaled_lr so that on one node start == end exactly (VISSL computes it this way).
    warmup_start = base_value * ((batch_size_per_replica * num_proc_per_node) / base_bs)
    info.update(global_batch_size=global_bs, scaling_type=scaling_type, factor=factor, scaled_lr=scaled_lr)
    _scale_schedule(cfg, scaled_lr, warmup_start, num_nodes, info)
    return cfg, info
