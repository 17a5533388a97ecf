"""Optimization: param groups, SGD + LARC (apex semantics) and fvcore-style LR schedules.

SimCLR (Chen et al. 2020, arXiv 2002.05709) trains with LARS, lr = 0.3 × B/256, linear warmup and cosine
decay; VISSL reproduces it with SGD (momentum 0.9) wrapped in apex LARC. Only ``torch`` is imported here;
sharding-aware norms are injected into :class:`LARC` by the engines.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Iterable, Optional

import torch

from .larc import LARC, local_norms
from .param_groups import NORM_TYPES, build_param_groups, is_norm_layer
from .schedulers import SCHEDULERS, auto_scale_lr, build_scheduler

__all__ = ["LARC", "local_norms", "build_param_groups", "is_norm_layer", "NORM_TYPES", "build_scheduler",
           "auto_scale_lr", "SCHEDULERS", "build_optimizer", "OPTIMIZERS"]

#: Supported ``OPTIMIZER.name`` values.
OPTIMIZERS = ("sgd",)
#: ``OPTIMIZER.larc_config`` keys; ``exclude_bias_and_norm`` is consumed by :func:`build_param_groups`.
_LARC_KEYS = ("clip", "trust_coefficient", "eps", "exclude_bias_and_norm")


def build_optimizer(
    param_groups: Iterable[Any],
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    use_larc: bool = False,
    larc_config: Optional[Mapping[str, Any]] = None,
    norm_fn: Any = None,
) -> torch.optim.Optimizer:
    """Builds VISSL/Classy's ``sgd`` optimizer, optionally wrapped in :class:`LARC`.

    Args:
        param_groups: groups from :func:`build_param_groups` (or any torch ``params`` iterable).
        name: optimizer name; only ``"sgd"`` (``torch.optim.SGD``, dampening 0).
        lr: initial learning rate (the LR schedule overwrites each group's ``lr`` every step).
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: default weight decay for groups without their own ``weight_decay``.
        use_larc: wrap the optimizer in :class:`LARC`.
        larc_config: ``{"clip", "trust_coefficient", "eps"}`` (``OPTIMIZER.larc_config``; an
            ``exclude_bias_and_norm`` key is accepted and ignored here). All three are required with
            ``use_larc``: the schema is the one source of their defaults.
        norm_fn: sharding-aware norm function passed to :class:`LARC` (see there).

    Returns:
        ``torch.optim.SGD`` or ``LARC`` wrapping it.

    Raises:
        ValueError: unknown optimizer name (LARC is only supported with SGD), or an unknown or missing LARC key.
    """
    if name != "sgd":
        if use_larc:
            raise ValueError(f"OPTIMIZER.use_larc requires OPTIMIZER.name 'sgd', got {name!r}")
        raise ValueError(f"Unsupported OPTIMIZER.name {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov,
                                weight_decay=weight_decay)
    if not use_larc:
        return optimizer
    cfg: Dict[str, Any] = dict(larc_config or {})
    unknown = sorted(set(cfg) - set(_LARC_KEYS))
    if unknown:
        raise ValueError(f"Unknown OPTIMIZER.larc_config key(s) {unknown}; allowed: {list(_LARC_KEYS)}")
    missing = [k for k in ("trust_coefficient", "clip", "eps") if k not in cfg]
    if missing:
        raise ValueError(f"OPTIMIZER.larc_config is missing {missing}; give trust_coefficient, clip and eps")
    return LARC(optimizer, trust_coefficient=float(cfg["trust_coefficient"]), clip=bool(cfg["clip"]),
                eps=float(cfg["eps"]), norm_fn=norm_fn)
