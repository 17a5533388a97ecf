"""``SimclrInfoNCELoss``: VISSL's ``simclr_info_nce_loss`` (spec 2.1) as an ``nn.Module``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import simclr_info_nce_loss
from .indices import check_loss_args


class SimclrInfoNCELoss(nn.Module):
    """SimCLR NT-Xent loss (Chen et al. 2020, arXiv 2002.05709, eq. 1) with VISSL's semantics.

    ``forward(embedding)`` takes this rank's ``[2B, D]`` projector outputs in view-major order, L2-normalises
    the rows, all-gathers them across ranks with gradient (rank-major) and returns the mean loss over this
    rank's ``2B`` anchors. Positive of local row ``a*B + i`` = global column ``rank*2B + (1-a)*B + i``; negatives
    = every other gathered row except self and the positive.

    Gradient contract: each rank returns the mean over its own anchors; the gather sums gradients back to the
    owner; DDP's gradient averaging then yields the gradient of the global mean loss.

    Args:
        temperature: ``T > 0`` (VISSL default 0.1).
        impl: ``"reference"`` (dense), ``"streaming"`` (tiled, O(N*D) memory), ``"triton"``, ``"auto"``.
        group: process group to gather over (``None``: default group).
    """

    def __init__(self, temperature: float = 0.1, impl: str = "reference",
                 group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__()
        check_loss_args(temperature, 2, "global", impl)
        self.temperature, self.impl, self.group = float(temperature), impl, group

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Args: embedding ``[2B, D]``. Returns: 0-d fp32 loss (fp64 for fp64 input)."""
        return simclr_info_nce_loss(embedding, self.temperature, self.impl, self.group)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}"
