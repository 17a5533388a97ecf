"""Index arithmetic for SimCLR / multi-crop InfoNCE positives and masks (no N x N mask tensors).

Layout (VISSL collators, spec 2.1/2.3/2.5): on every rank the ``C * B`` local rows are crop-major (view-major),
row ``c * B + i`` = crop ``c`` of local image ``i``. After the all-gather the rows are rank-major, so the global
column of (rank ``r``, crop ``c``, image ``i``) is ``r * C * B + c * B + i``.

For the local row ``k = c * B + i``:

- positives (``C - 1`` of them, VISSL's cyclic shifts ``d = 1 .. C-1``): columns ``rank*C*B + ((c+d) mod C)*B + i``;
- same-image columns (``C`` of them, ``d = 0`` is self): ``rank*C*B + ((c+d) mod C)*B + i`` for ``d = 0 .. C-1``;
- negatives: every other column of the negative domain (all ranks for ``"global"``, the own-rank block for
  ``"local"``) except the same-image columns.
"""
from __future__ import annotations

from typing import Tuple

import torch

IMPLS = ("reference", "streaming", "triton", "auto")
NEGATIVES = ("global", "local")


def check_loss_args(temperature: float, num_crops: int, negatives: str, impl: str) -> None:
    """Raise ``ValueError`` for invalid loss construction arguments, naming the allowed values."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not (isinstance(num_crops, int) and num_crops >= 2):
        raise ValueError(f"num_crops must be an int >= 2, got {num_crops!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_embedding(embedding: torch.Tensor, num_crops: int) -> int:
    """Validate a ``[num_crops * B, D]`` embedding and return ``B`` (images on this rank)."""
    if embedding.dim() != 2:
        raise ValueError(f"embedding must be 2-D [num_crops * B, D], got shape {tuple(embedding.shape)}")
    rows = embedding.shape[0]
    if rows == 0 or rows % num_crops != 0:
        raise ValueError(f"embedding rows ({rows}) must be a positive multiple of num_crops ({num_crops}): "
                         "crop-major layout, row c * B + i = crop c of image i")
    return rows // num_crops


def pair_columns(num_crops: int, batch_size: int, rank: int = 0,
                 device: torch.device | str | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global column indices of each local row's positives and same-image columns.

    Args:
        num_crops: ``C``.
        batch_size: ``B``, images on this rank.
        rank: this rank (its block starts at column ``rank * C * B``).
        device: device of the returned index tensors.

    Returns:
        ``(pos, same)``: ``pos`` is ``[C*B, C-1]`` int64 (column ``d-1`` = crop shift ``d``, VISSL's positive
        mask ``d``); ``same`` is ``[C*B, C]`` int64 (column 0 = self, then the positives in the same order).
    """
    L = num_crops * batch_size
    k = torch.arange(L, device=device)
    c, i = k // batch_size, k % batch_size
    d = torch.arange(num_crops, device=device)
    same = rank * L + ((c[:, None] + d[None, :]) % num_crops) * batch_size + i[:, None]
    return same[:, 1:].contiguous(), same


def transpose_shift(num_crops: int, batch_size: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """For ``w[k, d-1]`` indexed by (row, shift), return ``(rows, cols)`` so that ``w[rows, cols]`` is ``w[p, .]``
    of the pair seen from the positive: for ``p = pos(k, d)``, ``k = pos(p, C - d)``.

    Returns:
        ``(rows, cols)``: ``[C*B, C-1]`` local row index of ``p`` and ``[C-1]`` column ``C-d-1``.
    """
    pos, _ = pair_columns(num_crops, batch_size, 0, device)
    cols = torch.arange(num_crops - 2, -1, -1, device=device)
    return pos, cols
