"""``MulticropSimclrInfoNCELoss``: VISSL's ``multicrop_simclr_info_nce_loss`` (spec 2.3) as an ``nn.Module``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import multicrop_simclr_info_nce_loss
from .indices import check_loss_args


class MulticropSimclrInfoNCELoss(nn.Module):
    """Multi-crop SimCLR InfoNCE (arXiv 2002.05709 with SwAV-style multi-crop), VISSL's per-positive form.

    ``forward(embedding)`` takes this rank's ``[C*B, D]`` outputs in crop-major order (row ``c*B + i`` = crop
    ``c`` of image ``i``), L2-normalises them and returns the mean over this rank's ``C*(C-1)*B`` (anchor,
    positive) pairs of ``-log(e^{x_pos} / (e^{x_pos} + sum_neg e^{x_neg}))``. Negatives = all crops of other
    images: ``negatives="global"`` (default) uses every rank's images (rows gathered with gradient),
    ``"local"`` only this rank's (VISSL exactly). One process: both modes agree; ``C = 2``: equals
    :class:`SimclrInfoNCELoss`.

    Gradient contract: each rank returns the mean over its own pairs; the gather sums gradients back to the
    owner; DDP's gradient averaging then yields the gradient of the global mean loss.

    Args:
        temperature: ``T > 0``.
        num_crops: ``C >= 2`` (VISSL infers it from the multicrop transform, e.g. 6 for 2x160+4x96).
        negatives: ``"global"`` or ``"local"``.
        impl: ``"reference" | "streaming" | "triton" | "auto"``.
        group: process group (``None``: default group).
    """

    def __init__(self, temperature: float = 0.1, num_crops: int = 6, negatives: str = "global",
                 impl: str = "reference", group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__()
        check_loss_args(temperature, num_crops, negatives, impl)
        self.temperature, self.num_crops, self.negatives = float(temperature), num_crops, negatives
        self.impl, self.group = impl, group

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Args: embedding ``[C*B, D]``. Returns: 0-d fp32 loss (fp64 for fp64 input)."""
        return multicrop_simclr_info_nce_loss(embedding, self.temperature, self.num_crops, self.negatives,
                                              self.impl, self.group)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, num_crops={self.num_crops}, negatives={self.negatives!r}, "
                f"impl={self.impl!r}")
