"""DataLoader construction for training and evaluation.

Workers are persistent (no re-fork and no re-decoding of the file list every epoch) and run one intra-op
thread each: augmentation parallelism comes from the worker count (``config.DATA.NUM_DATALOADER_WORKERS``),
and N workers x M threads oversubscribes the CPUs that also feed the GPU. Worker seeding is irrelevant
for the augmentations (they use per-sample generators, ``scaleclr.data.transforms``).
"""
from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from typing import Any

import torch


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def build_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int,
                     collate_fn: Callable[[list], Any] | None, sampler: torch.utils.data.Sampler | None,
                     pin_memory: bool = False, prefetch_factor: int = 2,
                     multiprocessing_context: str | None = None) -> torch.utils.data.DataLoader:
    """Wraps ``dataset`` in a ``DataLoader`` fed by ``sampler``.

    Args:
        dataset: map-style dataset (``SSLDataset`` or ``EvalDataset``).
        batch_size: samples per batch and rank (``config.DATA.TRAIN.BATCHSIZE_PER_REPLICA``).
        num_workers: worker processes (``config.DATA.NUM_DATALOADER_WORKERS``); 0 loads in this process.
        collate_fn: e.g. ``get_collator("simclr_collator")``; ``None`` uses torch's default collation.
        sampler: index order, e.g. ``ShardedSampler`` (which yields whole batches only); ``None`` reads
            the dataset in order, keeping the last partial batch (evaluation).
        pin_memory: page-lock batches for asynchronous host-to-GPU copies (``config.DATA.PIN_MEMORY``).
        prefetch_factor: batches loaded ahead per worker.
        multiprocessing_context: start method of the workers; default ``fork`` on Linux (cheap start,
            shared source pages), the platform default elsewhere.

    Raises:
        ValueError: ``batch_size < 1`` or ``num_workers < 0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ValueError(f"config.DATA.NUM_DATALOADER_WORKERS={num_workers} must be >= 0")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        if multiprocessing_context is None and sys.platform.startswith("linux"):
            multiprocessing_context = "fork"
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=_worker_init,
                      multiprocessing_context=(multiprocessing.get_context(multiprocessing_context)
                                               if multiprocessing_context else None))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
                                       drop_last=False, **kwargs)
