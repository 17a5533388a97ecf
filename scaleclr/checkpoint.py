"""Checkpoint naming, discovery and atomic writes, for every engine.

Names follow VISSL: ``model_phase{E}`` after epoch E (0-based), ``model_iteration{I}`` for iteration
checkpoints, ``model_final_checkpoint_phase{E}`` at the end. An engine writes one file (``.torch``) or one
directory. After the engine has finished writing, the manager records the checkpoint in
``checkpoint.json`` (written to a temp file, then renamed): a run that dies while saving never moves that
pointer, so the last good checkpoint stays the one that resumes.
"""
import json
import os
import tempfile
from typing import Any, Dict, Optional

import torch

POINTER = "checkpoint.json"


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".torch")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(epoch: int, iteration: int, final: bool, end_of_epoch: bool) -> str:
    if final:
        return f"model_final_checkpoint_phase{epoch}"
    if end_of_epoch:
        return f"model_phase{epoch}"
    return f"model_iteration{iteration}"


class CheckpointManager:
    """Tracks the checkpoints of one run directory (`CHECKPOINT.DIR`)."""

    def __init__(self, directory: str):
        self.directory = directory

    def pointer_path(self) -> str:
        return os.path.join(self.directory, POINTER)

    def record(self, path: str, engine: str, epoch: int, iteration: int, final: bool) -> None:
        """Point 'latest' at `path` (call on rank 0 after every rank finished writing)."""
        history = self.read().get("history", []) if os.path.exists(self.pointer_path()) else []
        entry = {"path": os.path.basename(path), "engine": engine, "epoch": epoch, "iteration": iteration,
                 "final": final}
        history = [h for h in history if h["path"] != entry["path"]] + [entry]
        atomic_write_text(json.dumps({"latest": entry, "history": history}, indent=1), self.pointer_path())

    def forget(self) -> None:
        """Drop the pointer (OVERWRITE_EXISTING): the next run starts fresh; checkpoint files are kept."""
        if os.path.exists(self.pointer_path()):
            os.replace(self.pointer_path(), self.pointer_path() + ".old")

    def read(self) -> Dict[str, Any]:
        with open(self.pointer_path()) as f:
            return json.load(f)

    def latest(self, nth: int = 1) -> Optional[Dict[str, Any]]:
        """The nth most recent recorded checkpoint that still exists (1 = latest), or None."""
        if not os.path.exists(self.pointer_path()):
            return None
        hist = [h for h in self.read()["history"] if os.path.exists(os.path.join(self.directory, h["path"]))]
        if len(hist) < nth:
            return None
        entry = dict(hist[-nth])
        entry["abspath"] = os.path.join(self.directory, entry["path"])
        return entry

    def final(self) -> Optional[Dict[str, Any]]:
        latest = self.latest()
        return latest if latest and latest["final"] else None

