"""DataLoader construction for training and evaluation.

Workers are persistent (no re-fork and no re-decoding of the file list every epoch) and run one intra-op
thread each: augmentation parallelism comes from the worker count (``config.DATA.NUM_DATALOADER_WORKERS``),
and N workers x M threads oversubscribes the CPUs that also feed the GPU. Worker seeding is irrelevant
for the augmentations (they use per-sample generators, ``scaleclr.data.transforms``), and the loader draws
its workers' base seed from a private generator: ``iter(loader)`` (every epoch, and on resume) must not
consume the global RNG that dropout uses, or a resumed run's random ops would differ from the uninterrupted
run's.

Workers ignore the training process's stop signals (``ignore_signals``, ``config.TRAINER.STOP_SIGNALS``):
SLURM signals every process of a step, and a worker killed by SIGTERM would make the DataLoader raise
instead of letting the trainer checkpoint; the training process alone acts on them. Because a worker that
ignores SIGTERM also ignores ``multiprocessing``'s own ``terminate()`` at exit, every loader with workers is
shut down by a ``multiprocessing.util.Finalize`` that runs first when its process exits (a ``Process``
child such as a spawned trainer runs it too, where ``atexit`` does not run): without it, an exit with the
persistent workers still up would wait for them forever.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.util
import signal
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _worker_init(ignore_signals: tuple, worker_id: int) -> None:
    for s in ignore_signals:
        signal.signal(s, signal.SIG_IGN)
    torch.set_num_threads(1)


def _shutdown_workers(loader_ref: "weakref.ref[torch.utils.data.DataLoader]") -> None:
    """Tell a (persistent) loader's workers to exit and join them (torch's own shutdown of its iterator)."""
    loader = loader_ref()
    iterator = getattr(loader, "_iterator", None) if loader is not None else None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def build_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int,
                     collate_fn: Callable[[list], Any] | None, sampler: torch.utils.data.Sampler | None,
                     pin_memory: bool = False, prefetch_factor: int = 2,
                     multiprocessing_context: str | None = None, ignore_signals: Sequence[int] = ()
                     ) -> torch.utils.data.DataLoader:
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
        ignore_signals: signals the workers ignore (the training process's stop signals).

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
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor,
                      worker_init_fn=functools.partial(_worker_init, tuple(int(s) for s in ignore_signals)),
                      multiprocessing_context=(multiprocessing.get_context(multiprocessing_context)
                                               if multiprocessing_context else None))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
                                         drop_last=False, generator=torch.Generator().manual_seed(0), **kwargs)
    # before multiprocessing terminates (SIGTERM, maybe ignored) and joins the workers, and before the finalizers
    # of the loader's own queues (priority 10), which would close the queues the shutdown message goes through
    if num_workers > 0:
        multiprocessing.util.Finalize(None, _shutdown_workers, args=(weakref.ref(loader),), exitpriority=100)
    return loader
