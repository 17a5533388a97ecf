"""Optimizer parameter groups (VISSL's ``default`` param-group constructor, spec 5.3).

Every trainable parameter lands in exactly one group. Groups are split by *part* — ``trunk``, ``head``
(any module whose name contains ``"head"``) and ``remaining`` (parameters owned directly by modules that
are neither Linear/Conv nor norm layers) — and by *kind*:

* ``regularized``: weight decay ``weight_decay`` (``head_weight_decay`` for the head);
* ``unregularized``: weight decay 0;
* ``excluded`` (only with ``exclude_bias_and_norm``): weight decay 0 and ``larc_exclude=True``, i.e. LARC
  leaves these parameters alone — the SimCLR paper's LARS excludes biases and BN parameters from both
  weight decay and trust-ratio adaptation (arXiv 2002.05709, Appendix B.1 / google-research/simclr).

Rules (VISSL): Linear/Conv weights are regularized, their biases iff ``regularize_bias``; norm-layer
weights iff ``regularize_bn``, norm-layer biases iff ``regularize_bn and regularize_bias``; other modules'
parameters are regularized; names containing any ``non_regularized_parameters`` substring are moved to
weight decay 0. Norm layers are recognised by type, so a ResNet's ``downsample.1``, ``nn.SyncBatchNorm``,
apex's SyncBatchNorm and any custom ``_BatchNorm`` subclass count.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from torch import nn

__all__ = ["build_param_groups", "NORM_TYPES", "is_norm_layer"]

#: Module types whose parameters follow the ``regularize_bn`` rule (subclasses included).
NORM_TYPES: Tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_LINEAR_TYPES: Tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)

_PARTS = ("trunk", "head", "remaining")
_KINDS = ("regularized", "unregularized", "excluded")


def is_norm_layer(module: nn.Module) -> bool:
    """True for BatchNorm/SyncBatchNorm (torch, apex, custom subclasses), InstanceNorm, LayerNorm, GroupNorm."""
    return isinstance(module, NORM_TYPES)


def _classify(module_name: str, module: nn.Module, param_name: str, regularize_bn: bool,
              regularize_bias: bool) -> Tuple[str, bool]:
    """Returns ``(part, regularized)`` for a parameter owned directly by ``module``."""
    is_head = "head" in module_name
    if isinstance(module, _LINEAR_TYPES):
        regularized = regularize_bias if param_name == "bias" else True
    elif is_norm_layer(module):
        regularized = regularize_bn and (regularize_bias if param_name == "bias" else True)
    else:
        return "remaining", True
    return ("head" if is_head else "trunk"), regularized


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    regularize_bn: bool = True,
    regularize_bias: bool = True,
    exclude_bias_and_norm: bool = False,
    head_weight_decay: Optional[float] = None,
    non_regularized_parameters: Iterable[str] = (),
) -> List[Dict[str, Any]]:
    """Splits ``model``'s trainable parameters into optimizer param groups.

    Args:
        model: the model (e.g. :class:`scaleclr.models.SimCLRModel`, possibly wrapped by DDP/FSDP).
        weight_decay: weight decay of regularized trunk/remaining parameters (``OPTIMIZER.weight_decay``).
        regularize_bn: apply weight decay to norm-layer weights (and biases, with ``regularize_bias``).
        regularize_bias: apply weight decay to biases.
        exclude_bias_and_norm: SimCLR/BYOL-style: every parameter with ``ndim <= 1`` (biases, norm
            affine parameters) gets weight decay 0 and ``larc_exclude=True`` (no LARC adaptation); this
            overrides ``regularize_bn`` / ``regularize_bias`` for those parameters.
        head_weight_decay: weight decay of regularized head parameters; ``None`` = ``weight_decay``.
        non_regularized_parameters: name substrings; matching parameters get weight decay 0.

    Returns:
        Non-empty groups in the order trunk, head, remaining × regularized, unregularized, excluded; each a
        dict with ``params`` (list of parameters), ``weight_decay`` (float), ``name`` (e.g.
        ``"trunk_regularized"``) and ``larc_exclude`` (bool). Only ``requires_grad`` parameters appear,
        each exactly once.

    Raises:
        ValueError: negative weight decay, or ``non_regularized_parameters`` given as a single string.
    """
    head_weight_decay = weight_decay if head_weight_decay is None else head_weight_decay
    if weight_decay < 0 or head_weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got weight_decay={weight_decay}, "
                         f"head_weight_decay={head_weight_decay}")
    if isinstance(non_regularized_parameters, str):
        raise ValueError("non_regularized_parameters must be a list of name substrings, got the string "
                         f"{non_regularized_parameters!r}")
    non_reg = [str(s) for s in non_regularized_parameters]

    buckets: Dict[Tuple[str, str], List[nn.Parameter]] = {(p, k): [] for p in _PARTS for k in _KINDS}
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue
            part, regularized = _classify(module_name, module, param_name, regularize_bn, regularize_bias)
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if exclude_bias_and_norm and param.ndim <= 1:
                kind = "excluded"
            elif regularized and not any(s in full_name for s in non_reg):
                kind = "regularized"
            else:
                kind = "unregularized"
            buckets[(part, kind)].append(param)

    groups = []
    for part in _PARTS:
        for kind in _KINDS:
            params = buckets[(part, kind)]
            if not params:
                continue
            wd = (head_weight_decay if part == "head" else weight_decay) if kind == "regularized" else 0.0
            groups.append({"params": params, "weight_decay": float(wd), "name": f"{part}_{kind}",
                           "larc_exclude": kind == "excluded"})
    return groups
