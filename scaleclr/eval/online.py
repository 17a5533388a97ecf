"""Online linear probe: a linear classifier trained on the detached trunk features of the training views, in the
same step as the SimCLR update (solo-learn's ``online classifier``; the protocol it tracks is the linear evaluation
of Chen et al. 2020, arXiv 2002.05709, Sec. 4). No gradient reaches the trunk: the probe only reads ``h.detach()``.

Across ranks the probe is replicated: the same initialisation (seeded), gradients averaged with one all-reduce per
step, so N processes x B images train it like 1 process x N·B images. Its top-1 on the held-out split is counted
exactly over ranks (correct and total summed), from the features the kNN evaluation extracts anyway.

Legend: ``N`` rows (views) of this rank's batch, ``F`` trunk features, ``C`` classes.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from scaleclr.distributed.collectives import all_reduce_sum, is_distributed
from scaleclr.distributed.gather import world_info

__all__ = ["OnlineProbe"]


class OnlineProbe:
    """``Linear(F, C)`` + SGD, stepped once per training step on ``(h.detach(), labels)``.

    Args:
        in_features: ``F`` (the trunk's ``num_features``).
        num_classes: ``C`` (labels of the training data must lie in ``[0, C)``).
        lr, momentum, weight_decay: its SGD (``config.ONLINE_LINEAR_PROBE.*``); constant learning rate.
        seed: initialisation seed (``config.SEED_VALUE``): identical on every rank without a broadcast.
        device: where it lives (the training device).
    """

    def __init__(self, in_features: int, num_classes: int, lr: float, momentum: float, weight_decay: float,
                 seed: int, device: torch.device) -> None:
        self.linear = nn.Linear(in_features, num_classes)
        g = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default range, drawn from the seeded generator
        with torch.no_grad():
            self.linear.weight.copy_(torch.rand(num_classes, in_features, generator=g) * 2 * bound - bound)
            self.linear.bias.zero_()
        self.linear.to(device)
        self.opt = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def train_step(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step on the mean cross-entropy of this rank's rows (gradients averaged over ranks).

        Args:
            feats: ``[N, F]`` trunk features (detached here; any dtype, computed in fp32).
            labels: ``[N]`` int64 class indices on the same device.

        Returns:
            The rank's probe loss (0-d device tensor; no host synchronisation).
        """
        logits = self.linear(feats.detach().float())
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, list(self.linear.parameters()))
        if is_distributed():
            flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world_info()[1]
            grads = torch.split(flat, [g.numel() for g in grads])
        for p, g in zip(self.linear.parameters(), grads):
            p.grad = g.reshape(p.shape)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def correct(self, feats: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[correct, rows]`` (float64, this rank's valid rows) of the top-1 prediction; sum over ranks."""
        pred = self.linear(feats.float()).argmax(dim=1)
        return torch.stack([((pred == labels) & valid).sum(), valid.sum()]).to(torch.float64)

    def state_dict(self) -> Dict[str, Any]:
        return {"linear": {k: v.detach().cpu() for k, v in self.linear.state_dict().items()},
                "opt": self.opt.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.linear.load_state_dict(state["linear"])
        self.opt.load_state_dict(state["opt"])
