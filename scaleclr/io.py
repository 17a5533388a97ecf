"""Atomic file writes shared by the checkpoint manager and the engines.

A write goes to a temporary file in the target's directory, is flushed and fsynced, then renamed over the
target, and the directory itself is fsynced so the rename survives a power loss. A reader therefore sees
either the old file or the complete new one, never a partial write; a failed write leaves no temp file.
Directory checkpoints (FSDP, DeepSpeed) fsync their files and directory entries (:func:`fsync_tree`,
:func:`fsync_files`) before they are renamed into place or marked complete.

Files the user owns (``python -m scaleclr.export``): :func:`check_output_path` refuses an existing output unless
the user asked to replace it, and an output that is (or lies inside) one of the inputs even then; with
``overwrite=False`` the final step is a hard link instead of a rename, so a file created meanwhile is not
replaced either (where the file system has no hard links it falls back to checking just before the rename).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import torch

__all__ = ["OutputExistsError", "atomic_torch_save", "atomic_write_text", "check_output_path", "fsync_dir",
           "fsync_files", "fsync_tree", "replace_dir"]


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


class OutputExistsError(ValueError):
    """The output path exists and the user did not ask to replace it, or it is one of the inputs."""


def _same_or_inside(path: str, other: str) -> bool:
    """``path`` is ``other`` (also through links: same resolved path, or same inode) or lies inside it."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
        return True
    try:
        return os.path.samefile(path, other)  # a hard link to the input
    except OSError:
        return False


def check_output_path(out: str, inputs: Sequence[str] = (), overwrite: bool = False,
                      flag: str = "--overwrite") -> None:
    """Refuse to write ``out`` where that would replace something the user did not ask to replace.

    Raises:
        OutputExistsError: ``out`` is (or resolves to, or lies inside) one of ``inputs``, even with ``overwrite``;
            or ``out`` exists and not ``overwrite`` (the message names ``flag``).
    """
    for src in inputs:
        if _same_or_inside(out, src):
            raise OutputExistsError(f"OUT={out} is the input {src} (or inside it); writing it would destroy the "
                                    "input. Give another output path.")
    if os.path.lexists(out) and not overwrite:
        raise OutputExistsError(f"OUT={out} exists; pass {flag} to replace it, or give another output path")


def _atomic_write(path: str, write, binary: bool, suffix: str = "", overwrite: bool = True) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=suffix)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(d)


def _place_new(tmp: str, path: str) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (a hard link fails on an existing name)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"OUT={path} exists (it appeared while writing); nothing was replaced") from None
    except OSError:  # no hard links on this file system: check, then rename (a narrow window remains)
        if os.path.lexists(path):
            raise OutputExistsError(f"OUT={path} exists; nothing was replaced") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def atomic_torch_save(obj: Any, path: str, overwrite: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file, fsync, rename, directory fsync).

    ``overwrite=False``: raise :class:`OutputExistsError` instead of replacing an existing ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f), binary=True, suffix=".torch", overwrite=overwrite)


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
