"""Rank-0 progress bar, ``metrics.jsonl`` and TensorBoard scalars.

Every ``LOG_FREQUENCY`` steps one JSON line: step, epoch, loss (mean over ranks of this step), loss_avg
(mean over the steps since the last line), lr, images_per_sec (global), data_time, step_time (seconds,
averaged over the window), skipped_images (unreadable images replaced so far, summed over ranks). At the
end of each epoch: an ``epoch_loss`` line (mean over the epoch's steps and ranks).
"""
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_mean(x: torch.Tensor, world_size: int) -> float:
    """Mean of a scalar tensor over ranks (a no-op in one process)."""
    if world_size > 1 and dist.is_initialized():
        x = x.detach().float().clone()
        dist.all_reduce(x)
        x /= world_size
    return float(x)


def reduce_sum_int(n: int, world_size: int) -> int:
    if world_size > 1 and dist.is_initialized():
        t = torch.tensor([n], dtype=torch.int64, device=collective_device())
        dist.all_reduce(t)
        return int(t)
    return n


class MetricLogger:
    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True):
        self.out_dir, self.enabled = out_dir, enabled
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.bar = None
        self.tb = None
        self.file = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
                except ImportError:  # tensorboard is an install requirement; keep training without it
                    self.tb = None
        self._window = []
        self._epoch_losses = []
        self._t_run = time.perf_counter()

    def start_epoch(self, epoch: int, iters_per_epoch: int, start_iter: int, total_iters: int,
                    done_iters: int) -> None:
        self.total_iters, self._run_start_iter = total_iters, done_iters
        self._t_run = time.perf_counter()
        self._epoch_losses = []
        self._epoch = epoch
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=iters_per_epoch, initial=start_iter, desc=f"epoch {epoch}", file=sys.stderr,
                            dynamic_ncols=True, leave=True, mininterval=1.0)

    def log_step(self, step: int, epoch: int, loss: float, lr: float, images: int, data_time: float,
                 step_time: float, skipped_images: int, every: int) -> None:
        self._window.append((loss, data_time, step_time))
        self._epoch_losses.append(loss)
        if self.bar is not None:
            done = step - self._run_start_iter
            eta = (time.perf_counter() - self._t_run) / max(done, 1) * (self.total_iters - step)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}",
                                 img_s=f"{images / max(step_time + data_time, 1e-9):.1f}",
                                 eta=time.strftime("%H:%M:%S", time.gmtime(eta)), refresh=False)
            self.bar.update(1)
        if step % every != 0:
            return
        skipped = reduce_sum_int(skipped_images, self.world_size)  # every rank reaches this line
        n = len(self._window)
        losses, dts, sts = zip(*self._window)
        self._window = []
        rec = {"step": step, "epoch": epoch, "loss": loss, "loss_avg": sum(losses) / n, "lr": lr,
               "images_per_sec": images * n / max(sum(dts) + sum(sts), 1e-9), "data_time": sum(dts) / n,
               "step_time": sum(sts) / n, "skipped_images": skipped}
        self.write(rec)

    def end_epoch(self) -> Optional[float]:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self._epoch_losses:
            return None
        mean = sum(self._epoch_losses) / len(self._epoch_losses)
        self.write({"epoch_loss": mean, "epoch": self._epoch, "steps": len(self._epoch_losses)})
        return mean

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
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
