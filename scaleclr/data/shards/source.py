"""``webdataset``: an :class:`~scaleclr.data.sources.ImageSource` over WebDataset shards, read by global index.

Sample ``i`` is the ``i``-th sample of the shards in order (:mod:`scaleclr.data.shards.index`), so the sampler,
the per-sample augmentation seeds, resume and world-size invariance work exactly as for an ImageFolder, and
the same images in the same order give the same batches bit for bit.

Reads suit a network file system: each process (each loader worker) opens a shard once and keeps it open
(up to ``max_open`` at a time, least recently used closed first; the limit is raised towards the system's
hard ``RLIMIT_NOFILE`` when it is low), and reads a sample's image with one ``pread`` of its byte range plus
the 512-byte tar header in front of it. That header is checked against the index, so a shard rewritten since
its index was built stops the run with :class:`~scaleclr.data.shards.index.ShardError` naming shard and key
instead of feeding other bytes. Decoding goes through the folder sources' own functions, so an undecodable
member is skipped and counted like an unreadable file.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict

import numpy as np
from PIL import Image

from scaleclr.data.shards.index import ShardError, ShardIndex, expand_shards, load_or_build_index
from scaleclr.data.sources import ImageSource, load_rgb


def _fd_budget() -> int:
    """How many shards one process may keep open: half the (raised) soft ``RLIMIT_NOFILE``, at least 16."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        return max(16, int(min(soft, 1 << 20)) // 2)
    except (ImportError, ValueError, OSError):
        return 256


class ShardSource(ImageSource):
    """The images of WebDataset shards, by global sample index.

    Args:
        spec: a folder of ``.tar`` shards or brace notation (``/data/train-{000000..001023}.tar``).
        require_labels: every sample must have a ``cls`` (``LABEL_TYPE: standard``, evaluation); else samples
            without one get label -1.
        key: the config key named in error messages.
        max_open: shards one process keeps open (default: from ``RLIMIT_NOFILE``).
        shards: the shard files, when already known (the node-local copies); default: ``expand_shards(spec)``.

    Attributes:
        index: the :class:`ShardIndex`; ``labels``: int64 ``[N]``.
        files_opened: shard opens by this process (the benchmark reports it per 1,000 samples).

    Raises:
        ValueError: naming ``key``, the shard and the key of the sample: no shard matched, a truncated shard, a
            sample without an image, a sample without a label when ``require_labels``.
    """

    def __init__(self, spec: str, require_labels: bool = False, key: str = "config.DATA.TRAIN.DATA_PATHS[0]",
                 max_open: int | None = None, shards: list[str] | None = None):
        self.spec = spec
        self.shards = list(shards) if shards is not None else expand_shards(spec, key)
        try:
            self.index = load_or_build_index(self.shards)
        except ValueError as e:
            raise ValueError(f"{key}={spec!r}: {e}") from e
        self.labels = self.index.labels
        if require_labels and len(self.labels) and (self.labels < 0).any():
            i = int(np.argmax(self.labels < 0))
            shard = self.shards[int(self.index.shard_of[i])]
            raise ValueError(f"{key}={spec!r}: sample {self.index.key(i)!r} of shard {shard} has no label (no .cls "
                             "member), but labels are needed (LABEL_TYPE standard, evaluation); write the shards "
                             "with labels or use LABEL_TYPE sample_index")
        self.max_open = int(max_open) if max_open else _fd_budget()
        self.files_opened = 0
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor (pread: no shared file offset,
        # so a forked worker may go on using what it inherited)

    def shard_lengths(self) -> np.ndarray:
        """int64 ``[S]``: samples per shard, in order."""
        return np.diff(self.index.starts)

    def path(self, idx: int) -> str:
        return f"{self.shards[int(self.index.shard_of[idx])]}:{self.index.member(idx)}"

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.shards[shard], os.O_RDONLY)
            self.files_opened += 1
            self._fds[shard] = fd
        else:
            self._fds.move_to_end(shard)
        return fd

    def read(self, idx: int) -> bytes:
        """The bytes of sample ``idx``'s image member.

        Raises:
            IndexError: ``idx`` out of range.
            ShardError: the shard is shorter than the index says or its tar header there does not match.
        """
        if not 0 <= idx < len(self):
            raise IndexError(f"shard sample index {idx} out of range [0, {len(self)})")
        shard = int(self.index.shard_of[idx])
        offset, size = int(self.index.offsets[idx]), int(self.index.sizes[idx])
        block = os.pread(self._fd(shard), size + tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE)
        if len(block) != size + tarfile.BLOCKSIZE:
            raise ShardError(f"shard {self.shards[shard]} ends before member {self.index.member(idx)!r} (needs bytes "
                             f"up to {offset + size}, read {len(block)} of {size + tarfile.BLOCKSIZE}): the shard "
                             "was truncated after its index was built")
        if not self._header_matches(block, idx, size):
            raise ShardError(f"shard {self.shards[shard]} does not hold member {self.index.member(idx)!r} at byte "
                             f"{offset} as its index says: the shard changed after the index was built; restart "
                             "to rebuild the index")
        return block[tarfile.BLOCKSIZE:]

    def _header_matches(self, block: bytes, idx: int, size: int) -> bool:
        """The tar header before the data names the indexed member and holds its size (octal, or GNU base-256
        past 8 GiB). Names over 100 bytes (GNU long-name and pax records) are checked by size only."""
        name = self.index.member(idx).encode()
        field = block[:100].rstrip(b"\0")
        prefix = block[345:500].rstrip(b"\0") if block[257:265] == b"ustar\x0000" else b""  # POSIX ustar only
        if (prefix + b"/" + field if prefix else field) != name and len(name) <= 100:
            return False
        raw = block[124:136]
        try:
            stored = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            return False
        return stored == size

    def load(self, idx: int) -> Image.Image:
        return load_rgb(io.BytesIO(self.read(idx)))

    def open(self, idx: int) -> Image.Image:
        return Image.open(io.BytesIO(self.read(idx)))

    def close(self) -> None:
        """Closes this process's open shards."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()  # a spawned worker opens its own
        return state


def shard_lengths(source: ImageSource) -> np.ndarray | None:
    """Samples per shard of a shard source (or the first ``len(source)`` samples of one, ``DATA_LIMIT``),
    else None."""
    inner = getattr(source, "source", source)
    if not isinstance(inner, ShardSource):
        return None
    lengths = inner.shard_lengths()
    ends = np.minimum(np.cumsum(lengths), len(source))
    lengths = np.diff(np.concatenate([[0], ends]))
    return lengths[lengths > 0]
