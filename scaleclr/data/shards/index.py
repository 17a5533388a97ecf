"""WebDataset shards: finding them (a folder or brace notation) and the index of member offsets.

A shard is a plain POSIX tar file; a *sample* is the run of consecutive members that share a *key*, the
member name up to the first dot of its base name (WebDataset's convention: ``n01440764/0001.jpg`` and
``n01440764/0001.cls`` are the ``jpg`` and ``cls`` of sample ``n01440764/0001``). The image is the member
with extension ``jpg``, ``jpeg``, ``png`` or ``webp`` (case-insensitive); the label, when there is one, is the
integer text of ``cls``. Shards written by the ``webdataset`` library, ``tarp``, GNU tar or
``python -m scaleclr.data.shards write`` read unchanged.

The index (:class:`ShardIndex`) gives every sample a global position ``0 .. N-1`` (shards in list order,
samples in archive order) and the byte range of its image inside its shard, so a source can read sample
``i`` with one ``pread`` (:mod:`scaleclr.data.shards.source`). Building it reads only the tar headers. It is
saved as ``scaleclr-index-<hash>.npz`` beside the shards (or under ``$SCALECLR_DATA_CACHE/shard_index`` when
that folder is read-only) with each shard's size and mtime, and rebuilt when one of them changed.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: Image extensions a sample's image member may have (WebDataset's names), in order of preference.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = 1
_BRACE = re.compile(r"\{([^{}]*)\}")


class ShardError(RuntimeError):
    """A shard or its index cannot be read as promised (truncated shard, shard changed since its index was
    built). A ``RuntimeError``, not a decode error: the dataset stops instead of skipping the sample."""


def _expand_braces(pattern: str) -> list[str]:
    """Brace expansion as in WebDataset / bash: ``{000..011}`` (zero padding kept) and ``{a,b}``, nested
    in order, left to right."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in _expand_braces(head + item + tail)]


def is_shard_spec(spec: str) -> bool:
    """Whether ``spec`` names shards: a ``.tar`` path or pattern, or a folder holding ``.tar`` files."""
    if spec.endswith(".tar") or _BRACE.search(spec):
        return True
    return os.path.isdir(spec) and bool(glob.glob(os.path.join(glob.escape(spec), "*.tar")))


def expand_shards(spec: str, key: str = "config.DATA.TRAIN.DATA_PATHS[0]") -> list[str]:
    """The shard files ``spec`` names, in order: a folder's ``*.tar`` files sorted by name, a single ``.tar``, or
    brace notation (``/data/train-{000000..001023}.tar``), every file of which must exist.

    Raises:
        ValueError: naming ``key`` and ``spec``: a folder without ``.tar`` files, or a pattern matching no file
            or naming files that do not exist (the first few are listed).
    """
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        if not shards:
            raise ValueError(f"{key}={spec!r} is a folder without .tar shards (webdataset reads a folder of .tar "
                             "files or brace notation such as /data/train-{000000..001023}.tar)")
        return shards
    shards = _expand_braces(spec)
    missing = [s for s in shards if not os.path.isfile(s)]
    if len(missing) == len(shards):
        raise ValueError(f"{key}={spec!r} matches no shard file (expanded to {len(shards)} name(s), first "
                         f"{shards[0]!r}); give a folder of .tar files or brace notation of existing files")
    if missing:
        raise ValueError(f"{key}={spec!r}: {len(missing)} of {len(shards)} shards do not exist, first "
                         f"{missing[:3]}")
    return shards


def split_key(name: str) -> tuple[str, str]:
    """``("dir/0001", "seg.png")`` for ``dir/0001.seg.png``: WebDataset's key and (lower-case) extension."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(d, stem) if d else stem, ext.lower() if dot else ""


@dataclass
class ShardSamples:
    """The samples of one shard, in archive order (what :func:`scan_shard` returns)."""

    keys: list[str]
    exts: list[str]  # the image member's extension
    offsets: list[int]  # byte offset of the image data in the shard
    sizes: list[int]
    labels: list[int]  # -1 where the sample has no ``cls``


def scan_shard(path: str) -> ShardSamples:
    """Reads the tar headers of one shard and groups its members into samples.

    Raises:
        ValueError: naming the shard and the key: a truncated shard (a member runs past the end, or the
            end-of-archive blocks are missing), a sample without an image member, a non-integer ``cls``, a key
            that appears in two separate runs of members.
    """
    out = ShardSamples([], [], [], [], [])
    size = os.path.getsize(path)
    current: dict[str, tarfile.TarInfo] = {}
    cur_key: str | None = None
    seen: set[str] = set()
    cls_bytes: dict[str, bytes] = {}

    def close(key: str | None, f) -> None:
        if key is None:
            return
        image = next((current[e] for e in IMAGE_EXTS if e in current), None)
        if image is None:
            raise ValueError(f"shard {path}: sample {key!r} has no image member (has {sorted(current)}; an image "
                             f"is one of {list(IMAGE_EXTS)})")
        label = -1
        if "cls" in current:
            info = current["cls"]
            f.seek(info.offset_data)
            text = f.read(info.size)
            try:
                label = int(text.decode().strip())
            except (UnicodeDecodeError, ValueError):
                raise ValueError(f"shard {path}: sample {key!r}: its cls member {text[:40]!r} is not an integer "
                                 "label") from None
        out.keys.append(key)
        out.exts.append(split_key(image.name)[1])
        out.offsets.append(image.offset_data)
        out.sizes.append(image.size)
        out.labels.append(label)
        seen.add(key)

    last_key = "(start of archive)"
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise ValueError(f"shard {path} is truncated: member {info.name!r} needs bytes up to "
                                     f"{info.offset_data + info.size}, the file has {size}")
                key, ext = split_key(info.name)
                if key != cur_key:
                    pos = f.tell()
                    close(cur_key, f)
                    f.seek(pos)
                    if key in seen:
                        raise ValueError(f"shard {path}: key {key!r} appears in two separate runs of members "
                                         "(WebDataset samples are consecutive members)")
                    cur_key, current = key, {}
                current[ext] = info
                last_key = key
            close(cur_key, f)
            end = tar.offset
            f.seek(end)
            tail = f.read(2 * tarfile.BLOCKSIZE)
        except tarfile.TarError as e:
            raise ValueError(f"shard {path} is truncated or damaged after sample {last_key!r}: {e}") from e
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        raise ValueError(f"shard {path} is truncated or damaged after sample {last_key!r} (byte {end} of {size}): "
                         "the end-of-archive blocks are missing")
    return out


class ShardIndex:
    """Every sample of a list of shards: its shard, image byte range, key and label.

    Attributes:
        shards: the shard paths (as given).
        shard_sizes, shard_mtimes: int64 ``[S]``, what the index was built from.
        starts: int64 ``[S + 1]``: samples of shard ``s`` are ``starts[s] .. starts[s+1] - 1``.
        offsets, sizes, labels: int64 ``[N]``.
        exts: uint8 ``[N]``: position of the image extension in :data:`IMAGE_EXTS`.
    """

    def __init__(self, shards: Sequence[str], arrays: dict[str, np.ndarray]):
        self.shards = list(shards)
        self.shard_sizes = arrays["shard_sizes"]
        self.shard_mtimes = arrays["shard_mtimes"]
        self.starts = arrays["starts"]
        self.offsets, self.sizes, self.labels = arrays["offsets"], arrays["sizes"], arrays["labels"]
        self.exts = arrays["exts"]
        self._key_buf, self._key_off = arrays["key_buf"], arrays["key_off"]
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), np.diff(self.starts))

    def __len__(self) -> int:
        return len(self.offsets)

    def key(self, i: int) -> str:
        return self._key_buf[self._key_off[i]:self._key_off[i + 1]].tobytes().decode()

    def member(self, i: int) -> str:
        """The image member's name in its shard (``key.jpg``)."""
        return f"{self.key(i)}.{IMAGE_EXTS[self.exts[i]]}"

    @classmethod
    def build(cls, shards: Sequence[str]) -> "ShardIndex":
        """Scans every shard (headers only). Raises ``ValueError`` as :func:`scan_shard`."""
        parts = [scan_shard(s) for s in shards]
        keys = [k.encode() for p in parts for k in p.keys]
        key_off = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in keys], out=key_off[1:])
        stats = [os.stat(s) for s in shards]
        starts = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p.keys) for p in parts], out=starts[1:])
        arrays = {
            "shard_sizes": np.array([st.st_size for st in stats], dtype=np.int64),
            "shard_mtimes": np.array([st.st_mtime_ns for st in stats], dtype=np.int64),
            "starts": starts,
            "offsets": np.array([o for p in parts for o in p.offsets], dtype=np.int64),
            "sizes": np.array([z for p in parts for z in p.sizes], dtype=np.int64),
            "labels": np.array([lb for p in parts for lb in p.labels], dtype=np.int64),
            "exts": np.array([IMAGE_EXTS.index(e) for p in parts for e in p.exts], dtype=np.uint8),
            "key_buf": np.frombuffer(b"".join(keys), dtype=np.uint8).copy() if keys else np.zeros(0, np.uint8),
            "key_off": key_off,
        }
        return cls(shards, arrays)

    def stale_shard(self) -> str | None:
        """The first shard whose size or mtime differs from what the index was built from, else None."""
        for s, size, mtime in zip(self.shards, self.shard_sizes, self.shard_mtimes):
            st = os.stat(s)
            if st.st_size != size or st.st_mtime_ns != mtime:
                return s
        return None

    def save(self, path: str) -> None:
        """Writes the index atomically (temporary name, then rename)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, version=np.int64(INDEX_VERSION),
                     names=np.array([os.path.basename(s) for s in self.shards]),
                     shard_sizes=self.shard_sizes, shard_mtimes=self.shard_mtimes, starts=self.starts,
                     offsets=self.offsets, sizes=self.sizes, labels=self.labels, exts=self.exts,
                     key_buf=self._key_buf, key_off=self._key_off)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, shards: Sequence[str]) -> "ShardIndex | None":
        """The index saved at ``path`` if it describes ``shards`` (same names, sizes and mtimes), else None."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            return None
        if int(arrays.get("version", -1)) != INDEX_VERSION or \
                list(arrays["names"]) != [os.path.basename(s) for s in shards]:
            return None
        index = cls(shards, arrays)
        stale = index.stale_shard()
        if stale is not None:
            logger.warning("shard index %s is stale (shard %s changed since it was built): rebuilding", path, stale)
            return None
        return index


def index_path(shards: Sequence[str], cache_root: str | None = None) -> str:
    """Where the index of ``shards`` lives: ``<shard folder>/scaleclr-index-<hash>.npz`` when every shard is in one
    writable folder, else under ``cache_root`` (``$SCALECLR_DATA_CACHE/shard_index``)."""
    folders = {os.path.dirname(os.path.abspath(s)) for s in shards}
    digest = hashlib.sha1("\n".join(os.path.basename(s) for s in shards).encode()).hexdigest()[:16]
    name = f"scaleclr-index-{digest}.npz"
    if len(folders) == 1:
        folder = folders.pop()
        if os.access(folder, os.W_OK) or os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if cache_root is None:
        from scaleclr.data.catalog import cache_dir
        cache_root = os.path.join(cache_dir(), "shard_index")
    full = hashlib.sha1("\n".join(os.path.abspath(s) for s in shards).encode()).hexdigest()[:16]
    os.makedirs(cache_root, exist_ok=True)
    return os.path.join(cache_root, f"scaleclr-index-{full}.npz")


def load_or_build_index(shards: Sequence[str]) -> ShardIndex:
    """The saved index of ``shards`` when it is current, else a fresh one (saved for the next run)."""
    path = index_path(shards)
    index = ShardIndex.load(path, shards) if os.path.exists(path) else None
    if index is None:
        logger.info("indexing %d shard(s) -> %s", len(shards), path)
        index = ShardIndex.build(shards)
        try:
            index.save(path)
        except OSError as e:
            logger.warning("could not save the shard index %s (%s); it is rebuilt next time", path, e)
    return index
