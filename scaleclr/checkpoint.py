"""Checkpoint naming, discovery and the 'latest' pointer, for every engine.

Names follow VISSL: ``model_phase{E}`` after epoch E (0-based), ``model_iteration{S}`` for step checkpoints,
``model_final_checkpoint_phase{E}`` at the end. An engine writes one file (``.torch``) or one directory. After
the engine has finished writing, the manager records the checkpoint in ``checkpoint.json`` (written to a
temp file, then renamed): a run that dies while saving never moves that pointer, so the last good
checkpoint stays the one that resumes.

A record names its progress unambiguously: ``epochs_done`` (complete epochs: ``model_phase{E}`` has
``epochs_done = E + 1``), ``step`` (optimizer steps done) and ``final``.

Disk (``config.CHECKPOINT.KEEP_LAST = k >= 0``): after a new checkpoint is recorded, the manager keeps the
last k *iteration-like* checkpoints (``model_iteration*``, and epoch checkpoints VISSL's
``CHECKPOINT_FREQUENCY`` rule would not have kept, written because the run stopped at an epoch end), every
epoch checkpoint the rule keeps, the final one, and always the one 'latest' points at. The pointer is
rewritten without the dropped entries first, then their files or directories are deleted (with DeepSpeed's
``<tag>_consolidated_fp32.torch``); files the pointer never recorded are not touched. -1 keeps everything.

Verification at resume (:meth:`CheckpointManager.choose_resume`): a record also lists the size of every file of
its checkpoint (``files``: path relative to the run directory -> bytes, taken on rank 0 after every rank wrote).
Before a checkpoint is chosen, rank 0 checks that each recorded file exists and is not shorter than recorded
(truncation) and reads every ``torch.save`` file (a zip: DDP checkpoints, FSDP's client file, DeepSpeed's
model and optimizer files) through its CRC-32s, which ``torch.load`` itself does not check (a flipped bit
loads silently). FSDP's ``.distcp`` shards get the size check only; a failure while the engine loads is handled
by the trainer the same way. An unreadable checkpoint is named in a warning and the newest readable one is
used (``config.CHECKPOINT.ON_CORRUPT=fallback``), or the run stops (``error``, :class:`CheckpointUnreadable`,
exit status 2); nothing is deleted. When checkpoints were recorded but none is readable the run stops too: a
fresh start would silently replace the pointer of a run the user may want to repair.
"""
import json
import logging
import os
import shutil
import zipfile
from typing import Any, Dict, List, Optional

from scaleclr.interchange.checkpoints import migrate_record
from scaleclr.interchange.formats import CONSOLIDATED_SUFFIX
from scaleclr.io import atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

POINTER = "checkpoint.json"
# files written next to a checkpoint directory <tag>/ (DeepSpeed's consolidated export)
COMPANION_SUFFIXES = (CONSOLIDATED_SUFFIX,)  # files next to a checkpoint that belong to it


class CheckpointUnreadable(ValueError):
    """A recorded checkpoint is missing or unreadable and ``ON_CORRUPT=error`` (or none is readable)."""


def file_sizes(directory: str, path: str) -> Dict[str, int]:
    """``{path relative to directory: size}`` of the checkpoint file ``path`` or of every file under the
    checkpoint directory ``path``."""
    if not os.path.isdir(path):
        return {os.path.relpath(path, directory): os.path.getsize(path)}
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = os.path.getsize(p)
    return out


def unreadable_reason(directory: str, entry: Dict[str, Any]) -> Optional[str]:
    """Why the recorded checkpoint ``entry`` cannot be read (missing, truncated, a CRC mismatch), or None."""
    path = os.path.join(directory, entry["path"])
    if not os.path.exists(path):
        return "it is missing"
    sizes = entry.get("files") or file_sizes(directory, path)  # older records: check what is there
    for rel, size in sizes.items():
        p = os.path.join(directory, rel)
        if not os.path.exists(p):
            return f"its file {rel} is missing"
        actual = os.path.getsize(p)
        if actual < size:
            return f"{rel} is truncated ({actual} of {size} bytes)"
        if zipfile.is_zipfile(p):  # a torch.save file: every member's CRC-32
            try:
                with zipfile.ZipFile(p) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                return f"{rel} is not a readable torch file ({e})"
            if bad is not None:
                return f"{rel} is corrupt (CRC-32 mismatch in its member {bad})"
        elif p.endswith((".torch", ".pt")):
            return f"{rel} is not a readable torch file (no zip directory: truncated or overwritten?)"
    return None


def tag_for(epochs_done: int, step: int, end_of_epoch: bool, final: bool) -> str:
    """VISSL's name for a checkpoint taken after ``epochs_done`` complete epochs and ``step`` steps."""
    if final:
        return f"model_final_checkpoint_phase{epochs_done - 1}"
    if end_of_epoch:
        return f"model_phase{epochs_done - 1}"
    return f"model_iteration{step}"


class CheckpointManager:
    """Tracks the checkpoints of one run directory (`CHECKPOINT.DIR`).

    Args:
        directory: ``config.CHECKPOINT.DIR``.
        keep_last: ``config.CHECKPOINT.KEEP_LAST`` (-1: keep all).
        epoch_frequency: ``config.CHECKPOINT.CHECKPOINT_FREQUENCY`` (which epoch checkpoints are kept).
    """

    def __init__(self, directory: str, keep_last: int = -1, epoch_frequency: int = 1):
        self.directory = directory
        self.keep_last = keep_last
        self.epoch_frequency = epoch_frequency

    def pointer_path(self) -> str:
        return os.path.join(self.directory, POINTER)

    def record(self, path: str, engine: str, epochs_done: int, step: int, final: bool) -> None:
        """Point 'latest' at `path` (call on rank 0 after every rank finished writing)."""
        history = self.read().get("history", []) if os.path.exists(self.pointer_path()) else []
        entry = {"path": os.path.basename(path), "engine": engine, "epochs_done": epochs_done, "step": step,
                 "final": final, "files": file_sizes(self.directory, path)}
        history = [h for h in history if h["path"] != entry["path"]] + [entry]
        atomic_write_text(json.dumps({"latest": entry, "history": history}, indent=1), self.pointer_path())
        if self.keep_last >= 0:
            self.prune()

    def _kept_by_rule(self, h: Dict[str, Any]) -> bool:
        """The final checkpoint, and epoch checkpoints after epoch E with E % CHECKPOINT_FREQUENCY == 0."""
        if h["final"]:
            return True
        done = migrate_record(h)["epochs_done"]
        return h["path"].startswith("model_phase") and (done - 1) % self.epoch_frequency == 0

    def prune(self) -> List[str]:
        """Apply ``keep_last`` (module docstring); returns the names deleted. Call on rank 0 only."""
        data = self.read()
        latest, history = data["latest"], data["history"]
        prunable = [h for h in history if not self._kept_by_rule(h)]
        keep = prunable[max(0, len(prunable) - self.keep_last):] if self.keep_last > 0 else []
        drop = [h for h in prunable if h not in keep and h["path"] != latest["path"]]
        if not drop:
            return []
        names = {h["path"] for h in drop}
        atomic_write_text(json.dumps({"latest": latest, "history": [h for h in history if h["path"] not in names]},
                                     indent=1), self.pointer_path())
        for name in sorted(names):
            path = os.path.join(self.directory, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
            for suffix in COMPANION_SUFFIXES:
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
        fsync_dir(self.directory)
        return sorted(names)

    def forget(self) -> None:
        """Drop the pointer (OVERWRITE_EXISTING): the next run starts fresh; checkpoint files are kept."""
        if os.path.exists(self.pointer_path()):
            os.replace(self.pointer_path(), self.pointer_path() + ".old")
            fsync_dir(self.directory)

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
        entry = migrate_record(hist[-nth])
        entry["abspath"] = os.path.join(self.directory, entry["path"])
        return entry

    def choose_resume(self, nth: int = 1, on_corrupt: str = "fallback",
                      failed: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
        """The nth most recent *readable* recorded checkpoint (1 = latest), checked as the module docstring
        says, or None when nothing was recorded. Each unreadable one newer than it is named in a warning.

        Args:
            on_corrupt: ``config.CHECKPOINT.ON_CORRUPT``: ``fallback`` or ``error``.
            failed: ``{path: reason}`` of checkpoints the engine already failed to load (skipped as unreadable).

        Raises:
            CheckpointUnreadable: ``on_corrupt == "error"`` and one is unreadable; or checkpoints were recorded,
                some are unreadable and fewer than ``nth`` are readable (fewer than ``nth`` recorded, all readable:
                None, as before).
        """
        if not os.path.exists(self.pointer_path()):
            return None
        history = self.read()["history"]
        bad, good = [], 0
        for h in reversed(history):
            reason = (failed or {}).get(h["path"]) or unreadable_reason(self.directory, h)
            path = os.path.join(self.directory, h["path"])
            if reason is not None:
                bad.append(f"{path}: {reason}")
                if on_corrupt == "error":
                    raise CheckpointUnreadable(
                        f"cannot resume from {path}: {reason}. config.CHECKPOINT.ON_CORRUPT=error; set it to "
                        "fallback to resume from the newest readable checkpoint (nothing is deleted).")
                logger.warning("cannot resume from %s: %s; trying the previous checkpoint (nothing is deleted)",
                               path, reason)
                continue
            good += 1
            if good == nth:
                if bad:
                    logger.warning("resuming from %s, the newest readable checkpoint (%d newer one(s) unreadable)",
                                   path, len(bad))
                return {**migrate_record(h), "abspath": path}
        if bad:
            raise CheckpointUnreadable(f"no readable checkpoint to resume from in {self.directory} ("
                                       + "; ".join(bad) + "). Nothing was deleted: repair or move them, or set "
                                       "config.CHECKPOINT.OVERWRITE_EXISTING=True to start afresh.")
        return None

    def final(self) -> Optional[Dict[str, Any]]:
        latest = self.latest()
        return latest if latest and latest["final"] else None


def main(argv: Optional[list] = None) -> int:
    """``python -m scaleclr.checkpoint RUN_DIR [--final]``: print the path of the run's latest (or final) recorded
    checkpoint; exit status 2 when there is none (e.g. ``make train`` hands the pretraining's final checkpoint to
    the linear evaluation)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m scaleclr.checkpoint", description=main.__doc__)
    p.add_argument("run_dir", help="a config.CHECKPOINT.DIR")
    p.add_argument("--final", action="store_true", help="only a finished run's final checkpoint")
    args = p.parse_args(argv)
    manager = CheckpointManager(args.run_dir)
    entry = manager.final() if args.final else manager.latest()
    if entry is None:
        print(f"{args.run_dir}: no {'final ' if args.final else ''}checkpoint recorded in {POINTER}", file=sys.stderr)
        return 2
    print(entry["abspath"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
