"""Functional SimCLR / multi-crop InfoNCE losses: normalise, gather, dispatch to an implementation.

Loss gradient contract (DESIGN.md, spec 2.4): each rank returns the mean loss over its own anchors (pairs); the
gather sums the gradients of every gathered copy back to the row's owner; DDP's gradient averaging then yields
exactly the gradient of the global mean loss over all ranks' anchors. Every ``impl`` honours it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..distributed.gather import gather_with_grad, world_info
from .indices import check_embedding, check_loss_args
from .reference import info_nce_dense
from .streaming import info_nce_streaming

#: ``impl="auto"`` switches from the dense reference to the streaming path at this many logits per rank.
AUTO_STREAMING_MIN_LOGITS = 2048 * 2048
#: Widest embedding the Triton kernel takes: each program keeps a ``[64, BLOCK_D]`` fp32 row tile (and, in the
#: backward, a ``[64, BLOCK_D]`` fp32 accumulator) resident, which spills registers above D = 128 and exceeds
#: shared memory from D = 1024 (64 x 1024 x 4 B = 256 KiB > 228 KiB on H100). ``impl="auto"`` takes the streaming
#: path above it; ``impl="triton"`` is refused.
TRITON_MAX_DIM = 128


def triton_available(device: torch.device) -> bool:
    """Whether ``impl="triton"`` can run on ``device`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if importlib.util.find_spec("scaleclr.kernels.infonce_triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device, rows: int, cols: int, dim: int = 0) -> str:
    """Map ``impl`` (``reference | streaming | triton | auto``) to the implementation that will run for ``rows`` x
    ``cols`` logits of ``dim``-wide embeddings (Triton only up to :data:`TRITON_MAX_DIM`)."""
    if impl == "auto":
        if device.type == "cuda" and dim <= TRITON_MAX_DIM and triton_available(device):
            return "triton"
        return "streaming" if rows * cols >= AUTO_STREAMING_MIN_LOGITS or dim > TRITON_MAX_DIM else "reference"
    if impl == "triton" and not triton_available(device):
        raise ValueError("impl='triton': triton impl needs CUDA and triton (or TRITON_INTERPRET=1 on CPU); "
                         f"tensor is on {device}. Use impl='streaming', 'reference' or 'auto'.")
    if impl == "triton" and dim > TRITON_MAX_DIM:
        raise ValueError(f"impl='triton' handles embeddings up to D = {TRITON_MAX_DIM} wide, got D = {dim} "
                         "(config.LOSS.<loss>.buffer_params.embedding_dim). Use impl='streaming' or 'auto'.")
    return impl


def multicrop_simclr_info_nce_loss(embedding: torch.Tensor, temperature: float = 0.1, num_crops: int = 6,
                                   negatives: str = "global", impl: str = "reference",
                                   group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
    """Multi-crop SimCLR InfoNCE (VISSL ``multicrop_simclr_info_nce_loss``, spec 2.3; arXiv 2002.05709).

    Every ordered pair (anchor crop ``c``, positive crop ``c' != c``) of the same image is one term
    ``-log(e^{x_pos} / (e^{x_pos} + sum_{n} e^{x_n}))`` over the negatives ``n`` = all crops of other images
    (``negatives="global"``: of every rank; ``"local"``: of this rank only, VISSL exactly), ``x = z.z'/T`` on
    L2-normalised rows. Returns the mean over this rank's ``C*(C-1)*B`` pairs, computed in at least fp32
    (autocast is disabled inside). See the module docstring for the gradient contract.

    Args:
        embedding: ``[C*B, D]`` crop-major (row ``c*B + i`` = crop ``c`` of local image ``i``), any float dtype.
        temperature: ``T > 0``.
        num_crops: ``C >= 2``.
        negatives: ``"global"`` or ``"local"``.
        impl: ``"reference"`` (dense), ``"streaming"`` (tiled, O(N*D) memory), ``"triton"`` (fused kernels),
            ``"auto"``.
        group: process group to gather over (``None``: default group; single process when not initialised).

    Returns:
        0-d float32 tensor (float64 for float64 input).

    Raises:
        ValueError: invalid arguments, rows not a multiple of ``num_crops``, or no negatives (fewer than 2
            images in the negative domain).
    """
    check_loss_args(temperature, num_crops, negatives, impl)
    B = check_embedding(embedding, num_crops)
    rank, world = world_info(group) if negatives == "global" else (0, 1)
    if B * world < 2:
        raise ValueError(f"InfoNCE needs at least 2 images in the negative domain ({negatives!r} negatives): "
                         f"got {B} image(s) per rank x {world} rank(s)")
    L = embedding.shape[0]
    impl = resolve_impl(impl, embedding.device, L, L * world, embedding.shape[1])
    dtype = torch.promote_types(embedding.dtype, torch.float32)
    with torch.autocast(device_type=embedding.device.type, enabled=False):
        z = F.normalize(embedding.to(dtype), dim=1, eps=1e-12)
        if impl == "reference":
            z_all = gather_with_grad(z, group) if world > 1 else z
            return info_nce_dense(z, z_all, temperature=temperature, num_crops=num_crops, rank=rank,
                                  negatives="global")
        if impl == "streaming":
            return info_nce_streaming(z, temperature=temperature, num_crops=num_crops, negatives=negatives,
                                      group=group)
        from ..kernels.infonce_triton import info_nce_triton  # lazy: the only module importing triton
        return info_nce_triton(z, temperature=temperature, num_crops=num_crops, negatives=negatives, group=group)


def simclr_info_nce_loss(embedding: torch.Tensor, temperature: float = 0.1, impl: str = "reference",
                         group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
    """SimCLR NT-Xent with VISSL semantics (``simclr_info_nce_loss``, spec 2.1; arXiv 2002.05709 eq. 1).

    Local row ``a*B + i``'s positive is global column ``rank*2B + (1-a)*B + i``; its negatives are all other
    gathered rows except itself and the positive (both views of every other image on every rank). Returns the
    mean over this rank's ``2B`` anchors. Same as :func:`multicrop_simclr_info_nce_loss` with ``C = 2`` and
    global negatives.

    Args:
        embedding: ``[2B, D]`` view-major (``[view 0 of all images; view 1 of all images]``).
        temperature: ``T > 0``.
        impl: ``"reference" | "streaming" | "triton" | "auto"``.
        group: process group (``None``: default group).

    Returns:
        0-d float32 tensor (float64 for float64 input).
    """
    return multicrop_simclr_info_nce_loss(embedding, temperature, 2, "global", impl, group)
