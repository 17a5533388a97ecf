"""Models: the SimCLR ResNet trunk, VISSL ``mlp`` / ``eval_mlp`` heads, the trunk+heads wrapper and its
linear-evaluation variant (frozen trunk + classifier).

Single-device code only (never imports ``torch.distributed``); see arXiv 2002.05709.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict

from torch import nn

from .heads import HEADS, MLP, LinearEvalMLP, build_head, build_heads
from .linear_eval import LinearEvalModel
from .resnet import RESNET_LAYERS, ResNet, make_norm_layer
from .simclr import SimCLRModel

__all__ = ["ResNet", "MLP", "LinearEvalMLP", "SimCLRModel", "LinearEvalModel", "build_heads", "build_head",
           "build_trunk", "make_norm_layer", "MODELS", "HEADS", "RESNET_LAYERS"]

#: Named trunks: name -> constructor accepting the remaining :class:`ResNet` keyword arguments.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": partial(ResNet, depth=18),
    "resnet34": partial(ResNet, depth=34),
    "resnet50": partial(ResNet, depth=50),
    "resnet50_w2": partial(ResNet, depth=50, width_multiplier=2),
    "resnet50_w3": partial(ResNet, depth=50, width_multiplier=3),
    "resnet50_w4": partial(ResNet, depth=50, width_multiplier=4),
    "resnet101": partial(ResNet, depth=101),
    "resnet152": partial(ResNet, depth=152),
    "resnet200": partial(ResNet, depth=200),
}


def build_trunk(name: str, **kwargs: Any) -> nn.Module:
    """Builds a named trunk from :data:`MODELS`.

    Args:
        name: e.g. ``"resnet50"``, ``"resnet50_w2"``.
        **kwargs: further :class:`ResNet` arguments (e.g. ``zero_init_residual``).

    Raises:
        ValueError: unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown trunk {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
