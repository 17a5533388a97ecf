"""Map-style datasets: a source plus per-sample-seeded transforms.

``SSLDataset`` returns the views of one image for SimCLR pre-training. The augmentation generator of
sample ``idx`` is seeded from ``(seed, epoch, idx)`` (``scaleclr.data.transforms.sample_generator``), so
the views depend neither on which worker decodes the sample nor on the world size or the resume point.
The epoch lives in a shared-memory tensor: ``set_epoch`` in the main process reaches persistent data
workers (which hold their own copy of the dataset) as long as it is called before ``iter(loader)``.

Unreadable images are skipped instead of crashing a long run (VISSL substitutes a gray image, spec 7.1):
the next readable index (``idx + 1``, ``idx + 2``, ... modulo the length) is used instead, a warning names
each bad file once per process, and ``skipped`` is 1 for a sample whose own file is unreadable: every index is
visited once per epoch (across ranks and workers), so the trainer's sum counts each unreadable file once per
epoch, however many substitution attempts three bad files in a row take.

With the two-stage data path (``transforms`` a :class:`scaleclr.data.host_stage.HostStage`) a sample is
opened, planned and decoded inside the same skipping loop, so bad files meet the same rules, and each
attempt starts from a fresh generator of the requested index, as on the host path.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from scaleclr.data.host_stage import HostStage
from scaleclr.data.sources import ImageSource
from scaleclr.data.transforms import SSLTransforms, sample_generator

logger = logging.getLogger(__name__)

#: ``config.DATA.TRAIN.LABEL_TYPE`` (VISSL): the source's labels, the sample index, 0, or none (-1).
LABEL_TYPES = ("standard", "sample_index", "zero", "no_label")

# What PIL and the file system raise for missing, truncated or corrupt images.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class _SkippingLoader:
    """Loads ``source[idx]``, falling forward to the next readable index on a decode error."""

    def __init__(self, source: ImageSource, max_attempts: int):
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be >= 1")
        self.source = source
        self.max_attempts = max_attempts
        self._bad: set[int] = set()  # per process; a bad file is decoded (and warned about) once

    def load(self, idx: int, fetch: Callable[[int], Any] | None = None) -> tuple[Any, int, int]:
        """Returns ``(fetch(j), index j actually loaded, 1 if the file of idx itself is unreadable else 0)``;
        ``fetch`` defaults to ``source.load`` (the decoded image).

        Raises:
            RuntimeError: ``max_attempts`` consecutive images starting at ``idx`` are unreadable.
        """
        fetch = self.source.load if fetch is None else fetch
        n = len(self.source)
        attempts = min(self.max_attempts, n)
        for attempt in range(attempts):
            j = (idx + attempt) % n
            if j not in self._bad:
                try:
                    return fetch(j), j, int(attempt > 0)
                except DECODE_ERRORS as e:
                    self._bad.add(j)
                    logger.warning("skipping unreadable image %s (index %d): %s: %s",
                                   self.source.path(j), j, type(e).__name__, e)
        raise RuntimeError(f"{attempts} consecutive images from index {idx} ({self.source.path(idx)}) are "
                           f"unreadable; check the dataset files")


class SSLDataset(torch.utils.data.Dataset):
    """Views of one image per index for self-supervised training.

    Args:
        source: where the images come from (``scaleclr.data.sources.build_source``).
        transforms: the view pipeline (``scaleclr.data.transforms.build_transforms``), or the host stage
            of the two-stage path (``scaleclr.data.host_stage.HostStage``).
        seed: ``config.SEED_VALUE``.
        max_attempts: how many consecutive indices are tried when images are unreadable.
        label_type: ``config.DATA.TRAIN.LABEL_TYPE``: ``standard`` (the source's labels), ``sample_index``
            (VISSL's SimCLR setting), ``zero`` or ``no_label`` (-1). SimCLR's loss never reads labels.

    Shapes:
        ``__getitem__`` returns ``{"data": [V tensors [3, H_v, W_v]], "label": int, "data_idx": int,
        "skipped": 0 | 1}``. ``data_idx`` is the requested index (the sampler's), even when a following
        image was substituted for an unreadable one; ``label`` is the loaded image's label (-1 if unknown).
        With a ``HostStage`` the views are uint8 and the dict also holds ``"aug_params"``: float32
        ``[V, P]``, row ``v`` the device-stage parameters of view ``v``.
    """

    def __init__(self, source: ImageSource, transforms: SSLTransforms | HostStage, seed: int = 0,
                 max_attempts: int = 16, label_type: str = "standard"):
        if label_type not in LABEL_TYPES:
            raise ValueError(f"config.DATA.TRAIN.LABEL_TYPE={label_type!r}; allowed: {', '.join(LABEL_TYPES)}")
        self.label_type = label_type
        self.source = source
        self.transforms = transforms
        self.seed = int(seed)
        self._loader = _SkippingLoader(source, max_attempts)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the augmentations; call it before ``iter(loader)``."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.source)

    @property
    def two_stage(self) -> bool:
        """Whether this dataset is the host stage of the two-stage path (uint8 views + ``aug_params``)."""
        return isinstance(self.transforms, HostStage)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        epoch = self.epoch
        if self.two_stage:
            prepared, loaded, skipped = self._loader.load(
                idx, lambda j: self.transforms.load(self.source, j, sample_generator(self.seed, epoch, idx)))
            views, params = self.transforms.finish(prepared)
            return {"data": views, "aug_params": params, "label": self._label(loaded), "data_idx": idx,
                    "skipped": skipped}
        img, loaded, skipped = self._loader.load(idx)
        views = self.transforms(img, sample_generator(self.seed, epoch, idx))
        return {"data": views, "label": self._label(loaded), "data_idx": idx, "skipped": skipped}

    def _label(self, loaded: int) -> int:
        if self.label_type == "standard":
            return int(self.source.labels[loaded])
        return {"sample_index": loaded, "zero": 0, "no_label": -1}[self.label_type]


class EvalDataset(torch.utils.data.Dataset):
    """``(image tensor, label)`` pairs under a deterministic pipeline, for kNN / linear evaluation.

    Unreadable images are replaced like in :class:`SSLDataset` (with the substitute's label). The pipeline
    must produce one output per image; random transforms, if any, are seeded by the index only.

    Args:
        source: image source (labels must be known for accuracy metrics).
        transforms: e.g. ``build_transforms(eval_transform_specs(32))``.

    Shapes:
        ``__getitem__`` returns ``(tensor [3, H, W], label int)``.
    """

    def __init__(self, source: ImageSource, transforms: SSLTransforms, max_attempts: int = 16):
        if transforms.num_views != 1:
            raise ValueError(f"evaluation transforms must give one output per image, got {transforms.num_views} "
                             f"({transforms})")
        self.source = source
        self.transforms = transforms
        self._loader = _SkippingLoader(source, max_attempts)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        img, loaded, _ = self._loader.load(int(idx))
        (out,) = self.transforms(img, sample_generator(0, 0, int(idx)))
        return out, int(self.source.labels[loaded])
