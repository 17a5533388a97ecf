"""Distributed sampler that makes N-process runs step-for-step equal to 1-process runs, and resumable
mid-epoch.

Like ``torch.utils.data.DistributedSampler``, every epoch draws one global permutation from a generator
seeded with ``seed + epoch`` (identity when ``shuffle=False``) and pads it by repeating its start when
``drop_last=False``. The difference is how indices go to ranks. DistributedSampler deals them out
round-robin (``indices[rank::world]``), so global step ``k`` of a 2 x 4 run sees other images than step
``k`` of a 1 x 8 run. Here the permutation is cut into global batches of ``G = batch_size x num_replicas``
and rank ``r`` takes the contiguous slice ``r*B .. (r+1)*B - 1`` of each::

    permutation:  | global batch 0          | global batch 1          | ...
    1 x 8:        | rank0: p0 .. p7         | rank0: p8 .. p15        |
    2 x 4:        | rank0: p0..p3 rank1: p4..p7 | rank0: p8..p11 rank1: p12..p15 |

So the rank-major concatenation of the per-rank batches of step ``k`` (the order of the loss's all-gather)
is exactly the single-process batch of step ``k``. Together with per-sample augmentation seeds this is
what makes 1-process and N-process runs comparable step for step. Every rank gets the same number of
full batches (the SimCLR loss masks assume a fixed B per rank, spec 2.2): ``drop_last=True`` drops the
trailing partial global batch, ``drop_last=False`` pads it.

Shard-block shuffle (``shuffle_mode="shard_block"``, for WebDataset shards read from a network file system):
the epoch's order is drawn from a generator seeded by ``(seed, epoch)``: the shards in a random order, cut
into windows of ``block_shards`` consecutive shards, and the samples of each window permuted (seeded by
``(seed, epoch, window)``). Each rank's reads then stay within a few shards at a time. The order is one
global list like the permutation above, so it is independent of the number of workers and of the world
size, and resumes exactly.

Resume: ``state_dict(iteration)`` stores the epoch and the number of samples of this epoch consumed
globally; ``load_state_dict`` checks that the data and seed are the same and skips them. Because the layout depends only on the global batch, a run may
be resumed with another world size as long as ``batch_size x num_replicas`` divides the consumed count.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

#: ``config.DATA.TRAIN.SHUFFLE_MODE``.
SHUFFLE_MODES = ("global", "shard_block")


def _mix(*values: int) -> int:
    """A 63-bit seed from a few integers (SplitMix64 steps), so (seed, epoch, window) streams do not overlap."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Yields this rank's sample indices for one epoch, ``len(self)`` of them, in batch order.

    Use it with ``DataLoader(batch_size=batch_size, sampler=...)``: consecutive groups of ``batch_size``
    indices are this rank's batches.

    Args:
        dataset_len: number of samples in the dataset.
        num_replicas: world size.
        rank: this process's rank.
        shuffle: draw a new permutation per epoch (seeded by ``seed + epoch``).
        seed: ``config.SEED_VALUE``.
        drop_last: drop the trailing partial global batch (``config.DATA.TRAIN.DROP_LAST``) instead of
            padding it with samples from the start of the permutation.
        batch_size: images per rank and step (``config.DATA.TRAIN.BATCHSIZE_PER_REPLICA``).
        shuffle_mode: ``global`` (one permutation of all samples) or ``shard_block``
            (``config.DATA.TRAIN.SHUFFLE_MODE``; see the module docstring).
        shard_lengths: ``shard_block``: samples per shard, in order (their sum is ``dataset_len``).
        block_shards: ``shard_block``: shards per window (``config.DATA.TRAIN.SHUFFLE_BLOCK_SHARDS``).

    Raises:
        ValueError: non-positive sizes, rank out of range, a dataset smaller than one global batch
            with ``drop_last=True``, or ``shard_block`` without shard lengths that add up to ``dataset_len``.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, batch_size: int = 1, shuffle_mode: str = "global",
                 shard_lengths: Sequence[int] | None = None, block_shards: int = 1):
        if dataset_len < 1:
            raise ValueError(f"dataset_len={dataset_len}: the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch_size} must be >= 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must lie in [0, num_replicas={num_replicas})")
        global_batch = batch_size * num_replicas
        if drop_last and dataset_len < global_batch:
            raise ValueError(f"the dataset has {dataset_len} images, fewer than one global batch "
                             f"(config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch_size} x world size {num_replicas}"
                             f" = {global_batch}); lower the batch size or set config.DATA.TRAIN.DROP_LAST=False")
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.batch_size, self.global_batch_size = int(batch_size), global_batch
        if shuffle_mode not in SHUFFLE_MODES:
            raise ValueError(f"config.DATA.TRAIN.SHUFFLE_MODE={shuffle_mode!r}; allowed: {', '.join(SHUFFLE_MODES)}")
        if shuffle_mode == "shard_block":
            if shard_lengths is None or sum(int(n) for n in shard_lengths) != self.dataset_len:
                raise ValueError("config.DATA.TRAIN.SHUFFLE_MODE=shard_block needs a shard source "
                                 "(config.DATA.TRAIN.DATA_SOURCES=[webdataset])")
            if block_shards < 1:
                raise ValueError(f"config.DATA.TRAIN.SHUFFLE_BLOCK_SHARDS={block_shards} must be >= 1")
        self.shuffle_mode, self.block_shards = shuffle_mode, int(block_shards)
        self.shard_lengths = [int(n) for n in shard_lengths] if shard_lengths is not None else None
        self.epoch = 0
        self.start_iter = 0

    @property
    def num_batches(self) -> int:
        """Batches per rank in a full epoch (the same on every rank)."""
        if self.drop_last:
            return self.dataset_len // self.global_batch_size
        return math.ceil(self.dataset_len / self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's permutation; a new epoch clears the resume offset (``start_iter``)."""
        if epoch != self.epoch:
            self.start_iter = 0
        self.epoch = int(epoch)

    def set_start_iter(self, iteration: int) -> None:
        """Skips the first ``iteration`` batches of the current epoch (mid-epoch resume)."""
        if not 0 <= iteration <= self.num_batches:
            raise ValueError(f"start iteration {iteration} must lie in [0, {self.num_batches}] "
                             f"(batches per epoch)")
        self.start_iter = int(iteration)

    def global_indices(self) -> list[int]:
        """The epoch's permutation, truncated or padded to ``num_batches`` global batches.

        Shapes:
            ``[num_batches * batch_size * num_replicas]``.
        """
        if self.shuffle and self.shuffle_mode == "shard_block":
            order = self._shard_block_order()
        elif self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_batches * self.global_batch_size
        if total > len(order):  # pad like DistributedSampler: repeat from the start
            order = (order * math.ceil(total / len(order)))[:total]
        return order[:total]

    def _shard_block_order(self) -> list[int]:
        """Shards permuted by ``(seed, epoch)``, windows of ``block_shards`` shards, samples permuted per window."""
        assert self.shard_lengths is not None
        starts = [0]
        for n in self.shard_lengths:
            starts.append(starts[-1] + n)
        generator = torch.Generator()
        generator.manual_seed(_mix(self.seed, self.epoch))
        shards = torch.randperm(len(self.shard_lengths), generator=generator).tolist()
        order: list[int] = []
        for w in range(0, len(shards), self.block_shards):
            window = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in shards[w:w + self.block_shards]])
            generator.manual_seed(_mix(self.seed, self.epoch, w // self.block_shards + 1))
            order += window[torch.randperm(len(window), generator=generator)].tolist()
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.global_indices()
        g, b = self.global_batch_size, self.batch_size
        for step in range(self.start_iter, self.num_batches):
            start = step * g + self.rank * b
            yield from order[start:start + b]

    def __len__(self) -> int:
        return (self.num_batches - self.start_iter) * self.batch_size

    def state_dict(self, iteration: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        """The resume point (the trainer stores it in every checkpoint; ``load_state_dict`` checks it).

        Args:
            iteration: batches of the current epoch the trainer has finished (the sampler runs ahead of the
                training loop because of worker prefetching, so only the trainer knows). ``None`` means
                ``start_iter``, i.e. nothing consumed since the last (re)start; right at epoch boundaries.
            epoch: the epoch to resume in (default: the current one); at an epoch end, the next one.

        Returns:
            ``{"epoch", "consumed_samples"}`` (global count within the epoch) plus the fields that must
            match on resume (``seed``, ``dataset_len``, ``shuffle``, ``drop_last``).
        """
        iteration = self.start_iter if iteration is None else int(iteration)
        if not 0 <= iteration <= self.num_batches:
            raise ValueError(f"iteration {iteration} must lie in [0, {self.num_batches}]")
        return {"epoch": self.epoch if epoch is None else int(epoch),
                "consumed_samples": iteration * self.global_batch_size,
                "seed": self.seed, "dataset_len": self.dataset_len, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "shuffle_mode": self.shuffle_mode, "block_shards": self.block_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``epoch`` and skips the consumed samples.

        Raises:
            ValueError: the checkpoint was taken on another dataset/seed/shuffle setting (the permutation
                would differ), or its consumed count is not a multiple of this run's global batch.
        """
        for name in ("seed", "dataset_len", "shuffle", "shuffle_mode", "block_shards"):  # not drop_last: the tail
            if name in state and state[name] != getattr(self, name) and \
                    (name != "block_shards" or self.shuffle_mode == "shard_block"):
                raise ValueError(f"cannot resume the data order exactly: the checkpoint's sampler has "
                                 f"{name}={state[name]!r}, this run has {getattr(self, name)!r}")
        consumed = int(state["consumed_samples"])
        if consumed % self.global_batch_size:
            raise ValueError(f"the checkpoint consumed {consumed} samples of epoch {state['epoch']}, not a "
                             f"multiple of this run's global batch {self.global_batch_size}")
        self.epoch = int(state["epoch"])
        self.set_start_iter(consumed // self.global_batch_size)
