"""Rank-0 progress bar, ``metrics.jsonl`` and TensorBoard scalars. Takes plain numbers; runs no collective.

The trainer reduces over ranks and hands this logger finished records: every ``LOG_FREQUENCY`` steps one JSON
line (step, epoch, loss, loss_avg, lr, images_per_sec, data_time, step_time, skipped_images), an
``epoch_loss`` line per epoch, evaluation records (``knn_top1``, ...). On resume from step S the records of
steps after S that an interrupted run had already written are dropped (``metrics.jsonl`` is rewritten
atomically, TensorBoard purges them with ``purge_step``), so every step is logged once.
"""
import json
import os
import sys
import time
from typing import Any, Dict, Optional

from scaleclr.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def truncate_after(path: str, step: int) -> int:
    """Drop the records of ``path`` whose ``step`` is after ``step`` (rewritten atomically); returns how many."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except ValueError:  # a line cut by a crash
            continue
        if rec.get("step", 0) <= step:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    if len(keep) != len(lines):
        atomic_write_text("".join(keep), path)
    return len(lines) - len(keep)


class MetricLogger:
    """Writes records on rank 0 (``enabled``); every method is a no-op elsewhere.

    Args:
        out_dir: ``config.CHECKPOINT.DIR``.
        enabled: True on rank 0.
        tensorboard: also write TensorBoard scalars under ``out_dir/tb``.
        resume_step: the step a resumed run continues from (records after it are dropped), or None.
    """

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.out_dir, self.enabled = out_dir, enabled
        self.bar = None
        self.tb = None
        self.file = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, METRICS_FILE)
            if resume_step is not None:
                truncate_after(path, resume_step)
            self.file = open(path, "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(out_dir, "tb"),
                                            purge_step=None if resume_step is None else resume_step + 1)
                except ImportError:  # tensorboard is an install requirement; keep training without it
                    self.tb = None
        self._t_run = time.perf_counter()

    def start_epoch(self, epoch: int, steps_per_epoch: int, start_step_in_epoch: int, total_steps: int,
                    done_steps: int) -> None:
        self.total_steps, self._run_start_step = total_steps, done_steps
        self._t_run = time.perf_counter()
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=steps_per_epoch, initial=start_step_in_epoch, desc=f"epoch {epoch}",
                            file=sys.stderr, dynamic_ncols=True, leave=True, mininterval=1.0)

    def tick(self, step: int) -> None:
        """One step done (host-side bookkeeping only)."""
        if self.bar is not None:
            self.bar.update(1)

    def log_step(self, rec: Dict[str, Any]) -> None:
        """Write a step record (``step``, ``loss``, ``lr``, ``images_per_sec``, ...) and refresh the bar."""
        if self.bar is not None:
            done = rec["step"] - self._run_start_step
            eta = (time.perf_counter() - self._t_run) / max(done, 1) * (self.total_steps - rec["step"])
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.4g}",
                                 img_s=f"{rec['images_per_sec']:.1f}",
                                 eta=time.strftime("%H:%M:%S", time.gmtime(eta)), refresh=False)
        self.write(rec)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **rec}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = rec.get("step", 0)
            for k, v in rec.items():
                if k not in ("time", "step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
