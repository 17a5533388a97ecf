"""SimCLR network: trunk ``f`` followed by the projection heads ``g`` (arXiv 2002.05709, Sec. 2.1).

Single-device code: SyncBN conversion and data-parallel / sharded wrapping are applied from outside.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["SimCLRModel"]


class SimCLRModel(nn.Module):
    """Trunk + sequential heads, with VISSL's multi-resolution (multicrop) forward.

    Args:
        trunk: module mapping ``[N, 3, H, W]`` images to ``[N, F]`` features (e.g. :class:`ResNet`).
        heads: heads applied one after the other to the trunk features (e.g. from :func:`build_heads`);
            may be empty, in which case the embeddings are the trunk features.

    Attributes:
        trunk: the trunk (parameter names ``trunk.conv1.weight``, ...).
        heads: ``nn.ModuleList`` of heads (parameter names ``heads.0.clf.0.weight``, ...).
    """

    def __init__(self, trunk: nn.Module, heads: Union[nn.ModuleList, Sequence[nn.Module]]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = heads if isinstance(heads, nn.ModuleList) else nn.ModuleList(heads)

    def trunk_features(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Computes trunk features only (e.g. for kNN / linear evaluation).

        Args:
            x: images ``[N, 3, H, W]``, or a list of ``C`` crops ``[B, 3, H_c, W_c]`` (crop-major).

        Returns:
            ``[N, F]``, or ``[C·B, F]`` with row ``c·B + i`` = crop ``c`` of image ``i``.
        """
        if isinstance(x, torch.Tensor):
            return self.trunk(x)
        crops = list(x)
        if not crops:
            raise ValueError("SimCLRModel got an empty list of crops")
        feats: List[torch.Tensor] = []
        start = 0
        # VISSL's multi_res_input_forward (spec 3.3): consecutive crops of equal spatial size share one
        # trunk pass, so BatchNorm statistics are computed over the 2B large / 4B small crops together.
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batch = crops[start] if end == start + 1 else torch.cat(crops[start:end], dim=0)
            feats.append(self.trunk(batch))
            start = end
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=0)

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]], features_only: bool = False,
                return_features: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Computes embeddings ``z = g(f(x))``.

        Args:
            x: images ``[N, 3, H, W]``, or a list of ``C`` crops ``[B, 3, H_c, W_c]`` in crop-major order
                (multicrop). Consecutive crops with the same spatial size go through the trunk in one pass.
            features_only: return the trunk features ``h = f(x)`` ``[N, F]`` instead (kNN evaluation through
                whatever wraps the model: DDP, FSDP, DeepSpeed).
            return_features: return ``(z, h)`` (the online linear probe reads ``h``, detached).

        Returns:
            Embeddings ``[N, D]`` or ``[C·B, D]`` (row ``c·B + i`` = crop ``c`` of image ``i``); ``D`` is the
            last head's output width. The heads run once on the concatenated features.
        """
        h = self.trunk_features(x)
        if features_only:
            return h
        z = h
        for head in self.heads:
            z = head(z)
        return (z, h) if return_features else z

    def shard_units(self) -> List[nn.Module]:
        """Units an FSDP engine wraps separately: the trunk's residual blocks, then each head."""
        units = list(self.trunk.shard_units()) if hasattr(self.trunk, "shard_units") else []
        return units + list(self.heads)
