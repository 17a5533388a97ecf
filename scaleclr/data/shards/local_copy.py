"""``config.DATA.<split>.COPY_TO_LOCAL_DISK``: copy shards to node-local disk once per node, then read them there.

Every process of the run calls :func:`copy_to_local` with the same destination. The first one to take an
exclusive ``flock`` on ``<destination>/.copy.lock`` copies; the others block on the same lock (the node's
barrier) and find the work done. The lock lives on the destination, a node-local folder, so exactly one
process per node copies, whatever the launcher, and a copier that dies releases it: the next process takes
over where it stopped. Each shard is copied to a temporary name, fsynced and renamed, with its mtime kept
(``shutil.copy2``), so a destination file is either absent or complete, and one whose size and mtime match
its source is not copied again (resume). The index of the shard list is copied alongside when it exists;
otherwise it is built from the local copies.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence

from scaleclr.data.shards.index import index_path

logger = logging.getLogger(__name__)


def local_folder(spec: str, destination: str) -> str:
    """``<destination>/scaleclr_shards_<hash of spec>``: one folder per shard set, so two datasets never mix."""
    digest = hashlib.sha1(os.path.abspath(spec).encode()).hexdigest()[:12]
    return os.path.join(destination, f"scaleclr_shards_{digest}")


def _same(src: str, dst: str) -> bool:
    if not os.path.exists(dst):
        return False
    a, b = os.stat(src), os.stat(dst)
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _copy(src: str, dst: str) -> None:
    tmp = f"{dst}.part-{os.getpid()}"
    shutil.copy2(src, tmp)  # data, then mtime
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def copy_to_local(shards: Sequence[str], spec: str, destination: str) -> tuple[list[str], int]:
    """Copies ``shards`` (the expansion of ``spec``) into a node-local folder under ``destination``.

    Returns:
        ``(local shard paths in the same order, number of files this process copied)``.

    Raises:
        ValueError: ``destination`` cannot be created or written (naming it), or two shards share a name.
    """
    folder = local_folder(spec, destination)
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"COPY_TO_LOCAL_DISK: shards of {spec!r} share file names; give them distinct names")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".copy.lock"), "a")
    except OSError as e:
        raise ValueError(f"config.DATA.TRAIN.COPY_DESTINATION_DIR={destination!r}: cannot write there ({e})") from e
    local = [os.path.join(folder, n) for n in names]
    copied = 0
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here until the copier is done
        todo = [(s, d) for s, d in zip(shards, local) if not _same(s, d)]
        if todo:
            logger.info("copying %d of %d shard(s) of %s to %s", len(todo), len(shards), spec, folder)
        for s, d in todo:
            _copy(s, d)
            copied += 1
        src_index = index_path(shards)
        dst_index = os.path.join(folder, os.path.basename(src_index))
        if os.path.exists(src_index) and not _same(src_index, dst_index) and \
                os.path.basename(src_index) == os.path.basename(index_path(local)):
            _copy(src_index, dst_index)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return local, copied
