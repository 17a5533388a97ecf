"""Collators: per-sample view lists -> the batch layout the model and the losses expect (spec 2.5, 7.5).

Both layouts are view-major: rows ``v * B + i`` hold view ``v`` of local image ``i``, so the SimCLR
positives of row ``i`` are rows ``i + k * B`` (arXiv 2002.05709, Alg. 1: the 2N augmented examples).
``label`` and ``data_idx`` are repeated in the same row order. With the two-stage data path the views are
uint8 and each sample also brings ``aug_params`` ``[V, P]``, stacked in the same layout (one row per view).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def _check_views(samples: Sequence[dict[str, Any]], collator: str) -> int:
    if not samples:
        raise ValueError(f"{collator}: empty batch")
    num_views = len(samples[0]["data"])
    if any(len(s["data"]) != num_views for s in samples):
        raise ValueError(f"{collator}: samples have different numbers of views "
                         f"{sorted({len(s['data']) for s in samples})}")
    return num_views


def _repeat(samples: Sequence[dict[str, Any]], key: str, num_views: int) -> torch.Tensor:
    values = torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)
    return values.repeat(num_views)


def simclr_collator(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks all views into one tensor, view-major (VISSL ``simclr_collator``).

    Args:
        samples: ``B`` dicts from ``SSLDataset``, each with ``V`` views of equal shape.

    Returns:
        ``{"data": [V*B, 3, H, W], "label": [V*B], "data_idx": [V*B], "skipped": int}``; row ``v*B + i`` is
        view ``v`` of sample ``i``; ``skipped`` is the number of its samples whose file was unreadable (replaced
        by the next readable one); plus ``"aug_params": [V*B, P]`` (same rows) when the samples carry them.

    Raises:
        ValueError: views of different shapes (multi-crop needs ``multicrop_collator``).
    """
    num_views = _check_views(samples, "simclr_collator")
    shapes = {tuple(view.shape) for s in samples for view in s["data"]}
    if len(shapes) != 1:
        raise ValueError(f"simclr_collator needs views of one shape, got {sorted(shapes)}; set "
                         "config.DATA.TRAIN.COLLATE_FUNCTION=multicrop_collator for multi-crop transforms")
    data = torch.stack([s["data"][v] for v in range(num_views) for s in samples])
    batch = {"data": data, "label": _repeat(samples, "label", num_views),
             "data_idx": _repeat(samples, "data_idx", num_views),
             "skipped": sum(int(s.get("skipped", 0)) for s in samples)}
    if "aug_params" in samples[0]:  # [V*B, P], row v*B + i like data
        batch["aug_params"] = torch.stack([s["aug_params"][v] for v in range(num_views) for s in samples])
    return batch


def multicrop_collator(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One tensor per crop index (VISSL ``multicrop_collator``), for crops of several resolutions.

    Args:
        samples: ``B`` dicts from ``SSLDataset``, each with ``C`` crops; crop ``c`` has the same shape in
            every sample.

    Returns:
        ``{"data": [C tensors, tensor c shaped [B, 3, H_c, W_c]], "label": [C*B], "data_idx": [C*B],
        "skipped": int}``; labels and indices are crop-major like the rows of ``torch.cat(data)``; plus
        ``"aug_params": [C tensors [B, P]]`` when the samples carry them.
    """
    num_crops = _check_views(samples, "multicrop_collator")
    data = []
    for c in range(num_crops):
        shapes = {tuple(s["data"][c].shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"multicrop_collator: crop {c} has different shapes across samples {sorted(shapes)}")
        data.append(torch.stack([s["data"][c] for s in samples]))
    batch = {"data": data, "label": _repeat(samples, "label", num_crops),
             "data_idx": _repeat(samples, "data_idx", num_crops),
             "skipped": sum(int(s.get("skipped", 0)) for s in samples)}
    if "aug_params" in samples[0]:  # C tensors [B, P], like data
        batch["aug_params"] = [torch.stack([s["aug_params"][c] for s in samples]) for c in range(num_crops)]
    return batch


COLLATORS: dict[str, Callable[[Sequence[dict[str, Any]]], dict[str, Any]]] = {
    "simclr_collator": simclr_collator,
    "multicrop_collator": multicrop_collator,
}


def get_collator(name: str, key: str = "config.DATA.TRAIN.COLLATE_FUNCTION") -> Callable:
    """Returns the collator called ``name``.

    Raises:
        ValueError: unknown name (the message names ``key`` and the allowed names).
    """
    if name not in COLLATORS:
        raise ValueError(f"{key}={name!r} is not a known collator; allowed: {sorted(COLLATORS)}")
    return COLLATORS[name]
