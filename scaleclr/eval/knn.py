"""Weighted k-nearest-neighbour evaluation of frozen features.

The classifier of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", arXiv 1805.01978, Sec. 3.4), as used by DINO (Caron et al. 2021, arXiv 2104.14294):
features are L2-normalised, each test image takes its ``k`` most cosine-similar training images, and
each neighbour votes for its class with weight ``exp(sim / T)``; the class with the largest vote wins.
Test rows are processed in chunks so memory stays ``O(chunk x N_train)``.

Legend: ``N`` training rows, ``M`` test rows, ``D`` feature dim, ``C`` classes, ``K`` neighbours.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F


def extract_features(model_fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[Any],
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``model_fn`` over ``loader`` under ``torch.no_grad`` and stacks the outputs.

    The caller puts the model in eval mode (BN running statistics) and restores train mode afterwards.

    Args:
        model_fn: maps images ``[B, 3, H, W]`` to features ``[B, D]`` (e.g. the trunk's pooled output).
        loader: yields ``(images, labels)`` (``EvalDataset`` with default collation) or dicts with
            ``"data"`` and ``"label"``.
        device: where images are moved before ``model_fn``; ``None`` leaves them where they are.

    Returns:
        ``(features [N, D] float32 on CPU, labels [N] int64 on CPU)`` in loader order.
    """
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            images, targets = (batch["data"], batch["label"]) if isinstance(batch, Mapping) else batch[:2]
            if device is not None:
                images = images.to(device, non_blocking=True)
            out = model_fn(images)
            if out.dim() != 2:
                out = out.flatten(1)
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.int64).cpu())
    if not feats:
        raise ValueError("extract_features: the loader yielded no batch")
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
             chunk_size: int | None = None) -> float:
    """Top-1 accuracy (percent) of the temperature-weighted cosine kNN classifier.

    Args:
        train_feats: ``[N, D]`` training features (need not be normalised).
        train_labels: ``[N]`` class indices >= 0.
        test_feats: ``[M, D]``.
        test_labels: ``[M]``.
        k: neighbours per test row; clamped to ``N``.
        temperature: ``T`` in the vote weight ``exp(sim / T)`` (0.07 as in DINO).
        num_classes: ``C``; default ``max(labels) + 1``.
        chunk_size: test rows per similarity block; default keeps a block near 2**24 entries.

    Returns:
        Percentage of test rows whose top-voted class equals the label (ties: lowest class index).

    Raises:
        ValueError: shape mismatches, negative labels (e.g. -1 for an unlabelled source), ``k < 1`` or
            ``temperature <= 0``.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise ValueError(f"labels {tuple(train_labels.shape)}, {tuple(test_labels.shape)} do not match features "
                         f"{tuple(train_feats.shape)}, {tuple(test_feats.shape)}")
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("knn_top1 needs at least one training and one test row")
    if int(train_labels.min()) < 0 or int(test_labels.min()) < 0:
        raise ValueError("kNN evaluation needs class labels >= 0; the data source has unlabelled images (-1)")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k} temperature={temperature}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if int(max(train_labels.max(), test_labels.max())) >= num_classes:
        raise ValueError(f"labels reach {int(max(train_labels.max(), test_labels.max()))}, but "
                         f"num_classes={num_classes}")
    device = train_feats.device
    train_ND = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(device)
    test_labels = test_labels.to(device)
    k = min(int(k), train_ND.shape[0])
    chunk_size = chunk_size or max(1, min(4096, (1 << 24) // train_ND.shape[0]))
    correct = 0
    for start in range(0, test_feats.shape[0], chunk_size):
        test_MD = F.normalize(test_feats[start:start + chunk_size].to(device).float(), dim=1)
        sim_MN = test_MD @ train_ND.T
        top_sim_MK, top_idx_MK = sim_MN.topk(k, dim=1)
        weights_MK = (top_sim_MK / temperature).exp()
        votes_MC = torch.zeros(test_MD.shape[0], num_classes, device=device)
        votes_MC.scatter_add_(1, train_labels[top_idx_MK], weights_MK)
        pred_M = votes_MC.argmax(dim=1)
        correct += int((pred_M == test_labels[start:start + chunk_size]).sum())
    return 100.0 * correct / test_feats.shape[0]
