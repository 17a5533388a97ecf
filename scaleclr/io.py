"""Atomic file writes shared by the checkpoint manager and the engines.

A write goes to a temporary file in the target's directory, is flushed and fsynced, then renamed over the
target, and the directory itself is fsynced so the rename survives a power loss. A reader therefore sees
either the old file or the complete new one, never a partial write; a failed write leaves no temp file.
Directory checkpoints (FSDP, DeepSpeed) fsync their files and directory entries (:func:`fsync_tree`,
:func:`fsync_files`) before they are renamed into place or marked complete.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_text", "fsync_dir", "fsync_files", "fsync_tree", "replace_dir"]


def _fsync_path(path: str) -> None:
    """fsync the file or directory ``path``; a no-op where it is missing or the filesystem does not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` (persists renames/creations inside it); a no-op where unsupported."""
    _fsync_path(path)


def fsync_files(paths) -> None:
    """fsync each existing regular file in ``paths`` (data written by ``torch.save`` without its own fsync)."""
    for p in paths:
        _fsync_path(p)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and then every directory, deepest first (persists a directory
    checkpoint written by other code before it is renamed into place)."""
    for root, dirs, files in os.walk(path, topdown=False):
        fsync_files(os.path.join(root, f) for f in files)
        fsync_dir(root)


def _atomic_write(path: str, write, binary: bool, suffix: str = "") -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=suffix)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(d)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file, fsync, rename, directory fsync)."""
    _atomic_write(path, lambda f: torch.save(obj, f), binary=True, suffix=".torch")


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text), binary=False)


def replace_dir(tmp: str, path: str) -> None:
    """Move the complete directory ``tmp`` to ``path``, replacing an existing ``path``.

    The old directory is first renamed aside and only deleted once the new one is in place, so at every
    moment one complete copy exists under a known name.
    """
    import shutil

    parent = os.path.dirname(os.path.abspath(path))
    old = os.path.join(parent, ".old_" + os.path.basename(path))
    fsync_tree(tmp)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
