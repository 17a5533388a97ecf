"""A frozen trunk with a trainable classifier: the model of linear evaluation (arXiv 2002.05709, Sec. 4 / B.6).

SimCLR evaluates a representation by training a linear classifier on the frozen base encoder's output ``h``
(the final average pool, ``2048·w`` features for ResNet-50 ``w``x) "with a stop_gradient on the input to linear
classifier"; VISSL's ``FeatureExtractorModel`` (``MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY``) does the same
and keeps the trunk in eval mode, so its BatchNorm layers use the pretraining running statistics and never update
them. :class:`LinearEvalModel` is that model with scaleclr's module names (``trunk.*``, ``heads.0.*``), so its
checkpoints export to torchvision (``scaleclr.interchange.formats.CLASSIFIER_LAYOUTS``):

* the trunk's parameters have ``requires_grad=False`` (no optimizer state, no gradient buckets, nothing for an
  engine to reduce), and it runs under ``torch.no_grad()``: no activation is kept for backward;
* ``train()`` never puts the trunk in training mode;
* ``forward`` takes images ``[N, 3, H, W]`` or, for precomputed features (``PRECOMPUTE_FEATURES``), features
  ``[N, F]``; ``forward(x, features_only=True)`` returns the frozen features (what the feature extraction runs
  through the engine's wrapped model).

Single-device code: no ``torch.distributed``; engines wrap it like the pretraining model.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .simclr import SimCLRModel

__all__ = ["LinearEvalModel"]


class LinearEvalModel(SimCLRModel):
    """Frozen trunk ``f`` + one classifier head (VISSL ``mlp`` or ``eval_mlp``).

    Args:
        trunk: e.g. :class:`scaleclr.models.ResNet` (``[N, 3, H, W] -> [N, F]``).
        heads: exactly one head, the classifier ``[N, F] -> [N, C]``.
        flatten: ``MODEL.FEATURE_EVAL_SETTINGS.SHOULD_FLATTEN_FEATS``: the head gets ``[N, F]``; False gives it
            ``[N, F, 1, 1]``, VISSL's ``res5avg`` output (both heads accept either).

    Raises:
        ValueError: not exactly one head.
    """

    frozen_trunk = True

    def __init__(self, trunk: nn.Module, heads: Union[nn.ModuleList, Sequence[nn.Module]], flatten: bool = True):
        super().__init__(trunk, heads)
        if len(self.heads) != 1:
            raise ValueError(f"linear evaluation trains one classifier head, got {len(self.heads)}")
        self.flatten = bool(flatten)
        self.freeze_trunk()

    def freeze_trunk(self) -> None:
        """``requires_grad=False`` on every trunk parameter and the trunk in eval mode."""
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.trunk.eval()

    def train(self, mode: bool = True) -> "LinearEvalModel":
        """Sets the head's mode; the trunk stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.trunk.eval()
        return self

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's final average-pooled features, without gradient.

        Args:
            images: ``[N, 3, H, W]``.

        Returns:
            ``[N, F]`` (``F = 2048·w``, ``512·w`` for depths 18/34).
        """
        with torch.no_grad():
            return self.trunk(images)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Logits of the classifier (or the frozen features).

        Args:
            x: images ``[N, 3, H, W]`` or precomputed features ``[N, F]``.
            features_only: return the frozen features ``[N, F]`` instead (images only).

        Returns:
            ``[N, C]`` logits, or ``[N, F]`` with ``features_only``.
        """
        if x.dim() == 4:
            feats = self.frozen_features(x)
        elif x.dim() == 2 and not features_only:
            feats = x.detach()
        else:
            raise ValueError(f"LinearEvalModel takes images [N, 3, H, W] or features [N, F], got {tuple(x.shape)}"
                             + (" with features_only" if features_only else ""))
        if features_only:
            return feats
        if not self.flatten:
            feats = feats[:, :, None, None]
        return self.heads[0](feats)
