"""Dense reference implementation of the SimCLR / multi-crop InfoNCE loss (plain autograd).

Materialises the ``[C*B, N]`` logits of this rank's anchors against all gathered rows; memory O(C*B * N).
Used as the ground truth for the streaming and Triton implementations and for small batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .indices import pair_columns


def info_nce_dense(z_local: torch.Tensor, z_all: torch.Tensor, *, temperature: float, num_crops: int,
                   rank: int = 0, negatives: str = "global") -> torch.Tensor:
    """Mean per-(anchor, positive) InfoNCE over this rank's anchors, on already-normalised rows.

    For local anchor ``k`` (crop ``c`` of image ``i``) and each other crop ``p`` of the same image, the term is
    ``-log(e^{x_kp} / (e^{x_kp} + sum_{n in Neg(k)} e^{x_kn}))`` with ``x = z_k . z_j / temperature``; ``Neg(k)``
    is every crop of every other image in the negative domain. The result is the mean over the ``C*(C-1)*B``
    pairs (VISSL ``multicrop_simclr_info_nce_loss``; for ``C = 2`` this is exactly
    ``simclr_info_nce_loss``, spec 2.1/2.3; SimCLR, arXiv 2002.05709, eq. 1).

    Computed as ``softplus(lse_neg_k - x_kp)`` (accurate even when the loss is tiny), where ``lse_neg`` is a
    log-sum-exp over the logits with the same-image columns set to ``-inf`` (from indices) before any max.

    Args:
        z_local: ``[C*B, D]`` this rank's rows (crop-major), normalised; carries gradient.
        z_all: ``[W*C*B, D]`` rows of all ranks (rank-major), containing ``z_local`` at block ``rank``; for
            ``negatives="local"`` only block ``rank`` is used (pass ``z_local`` and ``rank=0``).
        temperature: softmax temperature ``T > 0``.
        num_crops: ``C``.
        rank: this rank's block index in ``z_all``.
        negatives: ``"global"`` (all ranks' other images) or ``"local"`` (own rank only, VISSL multicrop).

    Returns:
        0-d tensor in the dtype of ``z_local``.
    """
    L = z_local.shape[0]
    B = L // num_crops
    if negatives == "local":
        z_all, rank = z_all[rank * L:(rank + 1) * L], 0
    pos, same = pair_columns(num_crops, B, rank, z_local.device)
    inv_t = 1.0 / temperature
    # Positive logits from the rows themselves (O(L*C*D)), so the logits can be masked in place below.
    x_pos = (z_local[:, None, :] * z_all[pos]).sum(-1) * inv_t                  # [L, C-1]
    logits = torch.mm(z_local, z_all.t()).mul_(inv_t)                            # [L, N]
    logits.scatter_(1, same, float("-inf"))                                      # self + positives out
    lse_neg = torch.logsumexp(logits, dim=1, keepdim=True)                       # [L, 1]
    return F.softplus(lse_neg - x_pos, threshold=40.0).mean()  # = log(1 + sum_neg / e^{x_pos})
