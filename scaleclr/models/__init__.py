"""Models: the SimCLR ResNet trunk, VISSL ``mlp`` / ``eval_mlp`` heads, the trunk+heads wrapper and its
linear-evaluation variant (frozen trunk + classifier).

Single-device code only (never imports ``torch.distributed``); see arXiv 2002.05709.
"""
from __future__ import annotations

from .heads import HEADS, MLP, LinearEvalMLP, build_head, build_heads
from .linear_eval import LinearEvalModel
from .resnet import RESNET_LAYERS, ResNet, feature_dim, make_norm_layer
from .simclr import SimCLRModel

__all__ = ["ResNet", "MLP", "LinearEvalMLP", "SimCLRModel", "LinearEvalModel", "build_heads", "build_head",
           "feature_dim", "make_norm_layer", "HEADS", "RESNET_LAYERS"]
