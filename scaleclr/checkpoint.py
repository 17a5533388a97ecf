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
"""
import json
import os
import shutil
from typing import Any, Dict, List, Optional

from scaleclr.io import atomic_write_text, fsync_dir

POINTER = "checkpoint.json"
# files written next to a checkpoint directory <tag>/ (DeepSpeed's consolidated export)
COMPANION_SUFFIXES = ("_consolidated_fp32.torch",)


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
                 "final": final}
        history = [h for h in history if h["path"] != entry["path"]] + [entry]
        atomic_write_text(json.dumps({"latest": entry, "history": history}, indent=1), self.pointer_path())
        if self.keep_last >= 0:
            self.prune()

    def _kept_by_rule(self, h: Dict[str, Any]) -> bool:
        """The final checkpoint, and epoch checkpoints after epoch E with E % CHECKPOINT_FREQUENCY == 0."""
        if h["final"]:
            return True
        done = h.get("epochs_done", h.get("epoch"))
        return h["path"].startswith("model_phase") and (done - 1) % self.epoch_frequency == 0

    def prune(self) -> List[str]:
        """Apply ``keep_last`` (module docstring); returns the names deleted. Call on rank 0 only."""
        data = self.read()
        latest, history = data["latest"], data["history"]
        prunable = [h for h in history if not self._kept_by_rule(h)]
        keep = prunable[len(prunable) - self.keep_last:] if self.keep_last > 0 else []
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
        entry = dict(hist[-nth])
        entry["abspath"] = os.path.join(self.directory, entry["path"])
        return entry

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
