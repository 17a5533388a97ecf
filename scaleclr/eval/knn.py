"""Weighted k-nearest-neighbour evaluation of frozen features, sharded over ranks and exact.

The classifier of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", arXiv 1805.01978, Sec. 3.4), as used by DINO (Caron et al. 2021, arXiv 2104.14294):
features are L2-normalised, each test image takes its ``k`` most cosine-similar training images, and
each neighbour votes for its class with weight ``exp(sim / T)``; the class with the largest vote wins.

Sharded: every rank extracts the features of its shard of both splits through the engine's model
(:func:`extract_shard`), the test rows are all-gathered (the held-out split is the small one), every rank finds
the ``k`` best neighbours among its own training rows, and one all-gather of those ``W x k`` candidates per test
chunk gives the global top ``k``: the same neighbours, in the same order, as one process holding everything, so
1 process == N processes. Memory per rank: ``O(N / W x D + M x D + chunk x N / W)``.

Legend: ``N`` training rows, ``M`` test rows, ``D`` feature dim, ``C`` classes, ``K`` neighbours, ``W`` ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from scaleclr.distributed.collectives import collective_device
from scaleclr.distributed.gather import all_gather_no_grad, world_info
from scaleclr.eval.linear import split_batch, valid_rows

__all__ = ["extract_shard", "knn_top1"]


def extract_shard(features: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[Any], sampler,
                  device: torch.device, non_blocking: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's features of a split, padding rows included and marked, on ``device``.

    Args:
        features: images ``[B, 3, H, W]`` -> features ``[B, D]`` (caller: eval mode, ``no_grad``, autocast).
        loader, sampler: this rank's loader over the unshuffled, padded :class:`ShardedSampler` (every rank runs
            the same number of batches, so collectives inside ``features`` pair up).

    Returns:
        ``(features [S·B, D] float32, labels [S·B] int64, valid [S·B] bool)``: ``valid`` is False on the rows that
        pad the last global batch (:func:`valid_rows`).
    """
    feats, labels, valid = [], [], []
    for step, batch in enumerate(loader):
        inputs, y = split_batch(batch)
        feats.append(features(inputs.to(device, non_blocking=non_blocking)).float().flatten(1))
        labels.append(torch.as_tensor(y, dtype=torch.int64).to(device))
        valid.append(valid_rows(sampler, step, device=device)[:labels[-1].shape[0]])
    if not feats:
        raise ValueError("feature extraction: the loader yielded no batch")
    return torch.cat(feats), torch.cat(labels), torch.cat(valid)


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: Optional[int] = None,
             chunk_size: Optional[int] = None, train_valid: Optional[torch.Tensor] = None,
             test_valid: Optional[torch.Tensor] = None, group=None) -> float:
    """Top-1 accuracy (percent) of the temperature-weighted cosine kNN classifier over every rank's rows.

    In one process the arguments are the whole splits. Under ``torch.distributed`` every rank passes its own
    shard of each split (same row count on every rank, e.g. :func:`extract_shard`'s padded output with its
    ``valid`` masks); every rank returns the same figure. Collectives: a few scalars, one all-gather of the test
    rows, one all-gather of ``[chunk, K]`` candidates per test chunk.

    Args:
        train_feats: ``[N, D]`` training features (need not be normalised).
        train_labels: ``[N]`` class indices >= 0 (on valid rows).
        test_feats: ``[M, D]``.
        test_labels: ``[M]``.
        k: neighbours per test row; clamped to the number of valid training rows.
        temperature: ``T`` in the vote weight ``exp(sim / T)`` (0.07 as in DINO).
        num_classes: ``C``; default ``max(labels) + 1`` over every rank.
        chunk_size: test rows per similarity block; default keeps a block near 2**24 entries.
        train_valid, test_valid: optional ``[N]`` / ``[M]`` bool masks; rows where False are neither neighbours
            nor counted (the padding of a sharded split).
        group: process group (``None``: the default group).

    Returns:
        Percentage of valid test rows whose top-voted class equals the label (ties: lowest class index).

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
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k} temperature={temperature}")
    device = train_feats.device
    if train_valid is None:
        train_valid = torch.ones_like(train_labels, dtype=torch.bool)
    if test_valid is None:
        test_valid = torch.ones_like(test_labels, dtype=torch.bool)
    train_valid, test_valid = train_valid.to(device), test_valid.to(device)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    # evaluation, not the training step: reading a few global counts on the host is fine here
    n_train, n_test, low, high = _global_stats(train_labels, train_valid, test_labels, test_valid, group)
    if n_train == 0 or n_test == 0:
        raise ValueError("knn_top1 needs at least one training and one test row")
    if low < 0:
        raise ValueError("kNN evaluation needs class labels >= 0; the data source has unlabelled images (-1)")
    if num_classes is None:
        num_classes = high + 1
    if high >= num_classes:
        raise ValueError(f"labels reach {high}, but num_classes={num_classes}")
    k = min(int(k), n_train)
    train_ND = F.normalize(train_feats.float(), dim=1)
    test_all = all_gather_no_grad(test_feats.float(), group)  # [W·M, D], rank-major
    test_labels_all = all_gather_no_grad(test_labels, group)
    test_valid_all = all_gather_no_grad(test_valid.to(torch.uint8), group).bool()  # gloo gathers no bool
    k_local = min(k, train_ND.shape[0])
    chunk_size = chunk_size or max(1, min(4096, (1 << 24) // max(train_ND.shape[0], 1)))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, test_all.shape[0], chunk_size):
        test_MD = F.normalize(test_all[start:start + chunk_size], dim=1)
        sim_MN = (test_MD @ train_ND.T).masked_fill(~train_valid, float("-inf"))
        sim_MK = torch.full((test_MD.shape[0], k), float("-inf"), device=device)
        lab_MK = torch.zeros((test_MD.shape[0], k), dtype=torch.int64, device=device)
        top_sim, top_idx = sim_MN.topk(k_local, dim=1)  # this rank's best k (sorted, descending)
        sim_MK[:, :k_local], lab_MK[:, :k_local] = top_sim, train_labels[top_idx]
        # every rank's candidates side by side, [M, W·K]; the global best k among them, descending as in one
        # process (padding rows have -inf and are never among the best k <= valid training rows)
        cand_sim = torch.cat(all_gather_no_grad(sim_MK.unsqueeze(0), group).unbind(0), dim=1)
        cand_lab = torch.cat(all_gather_no_grad(lab_MK.unsqueeze(0), group).unbind(0), dim=1)
        best_sim, best = cand_sim.topk(k, dim=1)
        weights_MK = (best_sim / temperature).exp()
        votes_MC = torch.zeros(test_MD.shape[0], num_classes, device=device)
        votes_MC.scatter_add_(1, cand_lab.gather(1, best), weights_MK)
        pred_M = votes_MC.argmax(dim=1)
        rows = slice(start, start + test_MD.shape[0])
        correct += ((pred_M == test_labels_all[rows]) & test_valid_all[rows]).sum()
    return 100.0 * int(correct) / n_test


def _global_stats(train_labels, train_valid, test_labels, test_valid, group) -> Tuple[int, int, int, int]:
    """``(valid training rows, valid test rows, min label, max label)`` over every rank (two all-reduces)."""
    labels = torch.cat([train_labels[train_valid], test_labels[test_valid]])
    counts = torch.stack([train_valid.sum(), test_valid.sum()]).to(torch.float64)
    extremes = torch.stack([-labels.min(), labels.max()]).to(torch.float64) if labels.numel() else \
        torch.full((2,), float("-inf"), dtype=torch.float64, device=labels.device)
    if world_info(group)[1] > 1:
        dev = collective_device()
        counts, extremes = counts.to(dev), extremes.to(dev)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    (n_train, n_test), (neg_lo, hi) = counts.tolist(), extremes.tolist()
    return int(n_train), int(n_test), int(-neg_lo) if n_train + n_test else 0, int(hi) if n_train + n_test else 0
