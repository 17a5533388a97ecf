"""Float64 references for the InfoNCE losses, shared by every loss test (reference, streaming, Triton, distributed).

- :func:`oracle_info_nce`: written independently of ``scaleclr.losses``: explicit python loops over anchors and
  positives, VISSL's multiplicative form ``-log(pos / (pos + neg))`` without any log-sum-exp trick, float64.
- :func:`dense64`: ``scaleclr.losses.info_nce_dense`` on float64, L2-normalised rows (itself checked against the
  oracle in tests/test_losses.py); the reference for large batches, where the oracle's loops are too slow.
- :func:`loss_grad`: a loss and its gradient with respect to the input.
"""
import torch
import torch.nn.functional as F

from scaleclr.losses import info_nce_dense


def oracle_info_nce(h, num_crops, temperature, ranks=1, negatives="global", normalize=True):
    """Mean per-(anchor, positive) InfoNCE over a global batch, float64, by explicit loops.

    Args:
        h: ``[C * n_img, D]`` global batch, crop-major over ALL images (row ``c * n_img + n``).
        num_crops: ``C``.
        temperature: ``T``.
        ranks: images ``n`` are owned by rank ``n // (n_img // ranks)`` (only matters for local negatives).
        negatives: ``"global"`` (every other image) or ``"local"`` (other images of the same rank).
        normalize: L2-normalise rows first (``max(||h||, 1e-12)``).

    Returns:
        0-d float64 tensor (differentiable w.r.t. ``h``).
    """
    h = h.double()
    n_img = h.shape[0] // num_crops
    per_rank = n_img // ranks
    z = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else h
    terms = []
    for n in range(n_img):
        if negatives == "global":
            others = [m for m in range(n_img) if m != n]
        else:
            r = n // per_rank
            others = [m for m in range(r * per_rank, (r + 1) * per_rank) if m != n]
        neg_rows = torch.tensor([c * n_img + m for m in others for c in range(num_crops)], dtype=torch.long)
        for c in range(num_crops):
            anchor = z[c * n_img + n]
            neg = torch.exp(z[neg_rows] @ anchor / temperature).sum()
            for c2 in range(num_crops):
                if c2 == c:
                    continue
                pos = torch.exp(anchor @ z[c2 * n_img + n] / temperature)
                terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


def dense64(h, temperature, num_crops):
    """``info_nce_dense`` of the L2-normalised rows of ``h`` ``[C * n, D]``, in float64; 0-d tensor."""
    z = F.normalize(h.double(), dim=1)
    return info_nce_dense(z, z, temperature=temperature, num_crops=num_crops)


def loss_grad(fn, h):
    """``(fn(h) detached, d fn / d h)`` for a scalar loss ``fn`` of ``h``."""
    h = h.detach().clone().requires_grad_()
    loss = fn(h)
    (grad,) = torch.autograd.grad(loss, h)
    return loss.detach(), grad
