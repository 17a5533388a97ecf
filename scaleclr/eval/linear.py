"""Linear evaluation pieces below the trainer: exact top-k over sharded data, sharded feature extraction, and the
in-memory dataset of precomputed features.

Top-k accuracy (VISSL's ``accuracy_list_meter``, ``topk_values: [1, 5]``) is computed as *counts*: every rank sums,
on its device, the correct predictions of its rows and the number of rows; one all-reduce of those sums gives the
exact accuracy of the whole split (never an average of per-rank percentages, which is wrong for unequal shards).
The evaluation sampler (``ShardedSampler(shuffle=False, drop_last=False)``) gives every rank the same number of
full batches, padding the last global batch with the split's first images (collectives inside the forward, e.g.
FSDP's all-gathers, need equal batch counts); :func:`valid_rows` masks those padding rows out by position, so
every image is counted exactly once whatever the world size.

Legend: ``N`` images of the split, ``B`` rows per rank and batch, ``W`` ranks, ``G = B·W``, ``F`` feature width,
``C`` classes, ``K`` = ``len(topk_values)``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from scaleclr.data.sampler import ShardedSampler
from scaleclr.distributed.collectives import all_reduce_sum, collective_device, is_distributed

__all__ = ["topk_correct", "valid_rows", "evaluate_topk", "topk_percent", "extract_sharded_features",
           "FeatureDataset", "collate_feature_batch", "check_labels", "split_batch"]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int],
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many rows have their target among the ``k`` highest logits, for each ``k``.

    Args:
        logits: ``[N, C]``.
        targets: ``[N]`` class indices in ``[0, C)``.
        ks: e.g. ``[1, 5]``; each in ``[1, C]``.
        valid: optional ``[N]`` bool mask; rows where it is False are not counted.

    Returns:
        int64 ``[K]`` on ``logits``' device (no host synchronisation). Ties among equal logits are broken by
        ``torch.topk`` (lowest index first on CPU and CUDA for equal values is not guaranteed), so crafted tests
        use distinct logits.

    Raises:
        ValueError: shape mismatch or a ``k`` outside ``[1, C]``.
    """
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected [N, C] and [N]")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > logits.shape[1]:
        raise ValueError(f"top-k values {ks} must lie in [1, C={logits.shape[1]}]")
    top = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices  # [N, max k]
    hit = top == targets.to(top.device).view(-1, 1)  # at most one True per row
    if valid is not None:
        hit = hit & valid.to(hit.device).view(-1, 1)
    cum = hit.cumsum(dim=1)  # [N, max k]: target within the first j+1 predictions
    return torch.stack([cum[:, k - 1].sum() for k in ks]).to(torch.int64)


def valid_rows(sampler: ShardedSampler, step: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Which rows of this rank's batch ``step`` are real images (not the padding that completes the last global
    batch): the batch holds global positions ``step·G + rank·B .. + B - 1`` of the (unshuffled) order, real
    when below ``N``.

    Returns:
        bool ``[B]``.
    """
    if sampler.shuffle:
        raise ValueError("valid_rows needs an unshuffled sampler (ShardedSampler(shuffle=False))")
    start = step * sampler.global_batch_size + sampler.rank * sampler.batch_size
    return torch.arange(start, start + sampler.batch_size, device=device) < sampler.dataset_len


def split_batch(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of a batch: a ``(images, labels)`` pair (``EvalDataset`` + default collation) or a dict
    with ``"data"`` and ``"label"`` (``SSLDataset`` collators, :class:`FeatureDataset`)."""
    if isinstance(batch, Mapping):
        return batch["data"], batch["label"]
    return batch[0], batch[1]


def evaluate_topk(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[Any], sampler: ShardedSampler,
                  ks: Sequence[int], device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """This rank's counts over its shard: ``[rows counted, correct@k for k in ks]``, float64 on ``device``.

    Args:
        forward: images (or features) ``[B, ...]`` -> logits ``[B, C]``; the caller sets eval mode, ``no_grad``
            and autocast.
        loader: this rank's batches in sampler order (``loader`` built on ``sampler``), from the first batch.
        sampler: the unshuffled, padded :class:`ShardedSampler` behind ``loader``.
        ks: top-k values.

    Returns:
        float64 ``[1 + K]`` (exact integers); sum it over ranks (:func:`topk_percent`).
    """
    counts = torch.zeros(1 + len(ks), dtype=torch.float64, device=device)
    for step, batch in enumerate(loader):
        inputs, labels = split_batch(batch)
        inputs = inputs.to(device, non_blocking=non_blocking)
        labels = torch.as_tensor(labels).to(device, non_blocking=non_blocking)
        valid = valid_rows(sampler, step, device=device)[:labels.shape[0]]
        logits = forward(inputs)
        counts[0] += valid.sum()
        counts[1:] += topk_correct(logits.float(), labels, ks, valid)
    return counts


def topk_percent(counts: torch.Tensor, ks: Sequence[int], group=None) -> Dict[str, float]:
    """Sums :func:`evaluate_topk`'s counts over ranks (one all-reduce) and returns
    ``{"images": n, "top1": %, "top5": %, ...}``."""
    total = all_reduce_sum(counts, group=group).tolist()
    n = total[0]
    out: Dict[str, float] = {"images": int(n)}
    for k, c in zip(ks, total[1:]):
        out[f"top{k}"] = 100.0 * c / n if n else float("nan")
    return out


def extract_sharded_features(features: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[Any],
                             sampler: ShardedSampler, device: torch.device, non_blocking: bool = False,
                             path: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The features of a whole split, computed shard by shard and gathered on every rank one step at a time.

    Every rank runs ``features`` on its batches (same count on every rank, the padded sampler's); after each
    batch one all-gather of the ``[B, F]`` rows of every rank (``G·F`` values on the collective device, never the
    whole ``N x F``) puts them at their dataset positions, the padding dropped. The shuffled training sampler
    hands any image to any rank in a later epoch, so every rank reads the whole matrix: with ``path`` it is a
    file-backed tensor (``torch.from_file(shared=True)``), one file per node, whose pages the node's ranks share
    in the page cache instead of each holding a private ``N x F`` copy (ImageNet x R50-w4: 42 GB).

    Args:
        features: images ``[B, 3, H, W]`` -> features ``[B, F]`` (caller: eval mode, ``no_grad``, autocast).
        loader, sampler: this rank's loader over the unshuffled, padded :class:`ShardedSampler`.
        path: file for the ``[N, F]`` float32 matrix (created or overwritten; the same path on the ranks of one
            node); ``None`` keeps it in this process's memory.

    Returns:
        ``(features [N, F] float32 on CPU, labels [N] int64 on CPU)`` in dataset order, identical on every rank.
    """
    b, g, n = sampler.batch_size, sampler.global_batch_size, sampler.dataset_len
    out: Optional[torch.Tensor] = None
    labels = torch.empty(n, dtype=torch.int64)
    steps = 0
    for step, batch in enumerate(loader):
        inputs, y = split_batch(batch)
        f = features(inputs.to(device, non_blocking=non_blocking)).float()  # [B, F]
        if out is None:
            width = f.shape[1]
            out = (torch.from_file(path, shared=True, size=n * width, dtype=torch.float32).view(n, width)
                   if path else torch.empty(n, width, dtype=torch.float32))
        parts_f, parts_y = _all_gather(f), _all_gather(torch.as_tensor(y, dtype=torch.int64).to(device))
        for r, (pf, py) in enumerate(zip(parts_f, parts_y)):  # rank r's rows are positions step·G + r·B + i
            lo = step * g + r * b
            keep = max(0, min(b, n - lo))
            out[lo:lo + keep] = pf[:keep]
            labels[lo:lo + keep] = py[:keep]
        steps += 1
    if out is None:
        raise ValueError("feature extraction: the loader yielded no batch")
    if steps != sampler.num_batches:
        raise ValueError(f"feature extraction: {steps} batches, the sampler has {sampler.num_batches}")
    return out, labels


def _all_gather(x: torch.Tensor) -> List[torch.Tensor]:
    """Every rank's equally shaped ``x``, rank-major, on the CPU."""
    if not is_distributed():
        return [x.cpu()]
    dev = collective_device()
    parts = [torch.empty_like(x, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.to(dev))
    return [p.cpu() for p in parts]


class FeatureDataset(torch.utils.data.Dataset):
    """Precomputed frozen features with their labels, read a whole batch at a time.

    Built with the number of images only; :meth:`fill` sets the features once they are extracted (after the
    trainer has resumed, so they come from the trunk that is actually trained on). ``__getitems__`` (the
    DataLoader's batched fetch) returns ``{"data": [B, F], "label": [B], "data_idx": [B]}``; use
    :func:`collate_feature_batch` as ``collate_fn`` and no workers.
    """

    def __init__(self, num_images: int):
        self.num_images = int(num_images)
        self.features: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None

    def fill(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.shape[0] != self.num_images or labels.shape != (self.num_images,):
            raise ValueError(f"expected {self.num_images} feature rows and labels, got {tuple(features.shape)} and "
                             f"{tuple(labels.shape)}")
        self.features, self.labels = features, labels

    def set_epoch(self, epoch: int) -> None:
        """Features have no augmentation: nothing depends on the epoch."""

    def __len__(self) -> int:
        return self.num_images

    def __getitems__(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        if self.features is None:
            raise RuntimeError("FeatureDataset read before its features were extracted (fill)")
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return {"data": self.features[idx], "label": self.labels[idx], "data_idx": idx}

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        one = self.__getitems__([int(index)])
        return {k: v[0] for k, v in one.items()}


def collate_feature_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``collate_fn`` for :class:`FeatureDataset`: its ``__getitems__`` already returns the batch."""
    return batch


def check_labels(labels: Sequence[int], num_classes: int, key: str, head_key: str = "config.MODEL.HEAD.PARAMS"
                 ) -> None:
    """Linear evaluation needs every label in ``[0, num_classes)``; checked once when the data are built, so the
    training step never reads a label on the host.

    Raises:
        ValueError: naming ``key`` (the split) and the head's output width.
    """
    if not len(labels):
        raise ValueError(f"{key}: no images")
    lo, hi = min(labels), max(labels)
    if lo < 0:
        raise ValueError(f"{key}: some images have no label ({lo}); linear evaluation needs labelled data "
                         "(disk_folder class folders, or LABEL_SOURCES=[disk_filelist] with LABEL_PATHS)")
    if hi >= num_classes:
        raise ValueError(f"{key}: labels reach {hi} but the classifier ({head_key}) has {num_classes} outputs; set "
                         f"its last dim to the number of classes ({hi + 1} or more)")
