"""Step throughput: ``Trainer.train_step`` against a bare PyTorch loop, interleaved in one process.

For each row (model, resolution, precision, memory format) the script times the real trainer step (DDP engine
in one process: autocast, BatchNorm policy, LARC, loss, LR schedule, device-side loss statistics) and a bare loop
written here with the same model, SGD + LARC, SimCLR loss, plain ``torch.autocast`` and, when the row says so,
``channels_last`` model and inputs. Both run on the same prefetched batch, so data loading is excluded. Rounds
alternate trainer / bare / bare in the other memory format, and the median over rounds is reported; the ratio
trainer / bare(same format) and trainer / best bare (the faster memory format) are printed. Target: >= 0.97.

    python benchmarks/step_throughput.py                       # R50 @ 64 px and R50-w2 @ 32 px, 16 images x 2 views
    python benchmarks/step_throughput.py --rows r50 --rounds 5 --steps 3
    python benchmarks/step_throughput.py --device cuda --size 224 --batch 64   # on a GPU
    python benchmarks/step_throughput.py --smoke                # tiny, seconds (used by the test suite)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaleclr.config import load_config  # noqa: E402
from scaleclr.losses import SimclrInfoNCELoss  # noqa: E402
from scaleclr.optim import LARC  # noqa: E402
from scaleclr.trainer import Trainer  # noqa: E402

ROWS = {"r50": (50, 1), "r50w2": (50, 2), "r18": (18, 1)}


def _overrides(depth, width, size, batch, bf16, channels_last, device, compile_):
    o = ["config=test/integration_test/quick_simclr_synthetic", f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}",
         f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={width}", f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}",
         f"config.DATA.TRAIN.DATA_LIMIT={batch * 2}", f"config.DATA.TRAIN.SYNTHETIC_IMAGE_SIZE={size + size // 4}",
         f"config.DATA.TRAIN.TRANSFORMS.1.size={size}", "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=False",
         f"config.MODEL.CHANNELS_LAST={'on' if channels_last else 'off'}", f"config.MODEL.TORCH_COMPILE={compile_}",
         "config.CHECKPOINT.DIR=/tmp/scaleclr_step_throughput", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
         "config.LOG_FREQUENCY=100000", f"config.MACHINE.DEVICE={'gpu' if device.type == 'cuda' else 'cpu'}",
         "config.OPTIMIZER.num_epochs=1000"]
    if bf16:
        o += ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
              "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"]
    return o


class Bare:
    """The loop a user would write: model, SGD + LARC, the SimCLR loss, autocast, optional channels_last."""

    def __init__(self, model, trainer: Trainer, bf16: bool, channels_last: bool, device):
        self.model = copy.deepcopy(model).to(device)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        c = trainer.c.OPTIMIZER
        sgd = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=c.momentum, weight_decay=c.weight_decay)
        lc = c.larc_config
        self.opt = LARC(sgd, trust_coefficient=lc.trust_coefficient, clip=lc.clip, eps=lc.eps)
        self.loss = SimclrInfoNCELoss(temperature=trainer.c.LOSS.simclr_info_nce_loss.temperature)
        self.bf16, self.device = bf16, device

    def step(self, batch):
        x = batch["data"].to(self.device, non_blocking=True, memory_format=self.fmt)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z = self.model(x)
        loss = self.loss(z.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def _timed(fn, batch, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def run_row(name, size, batch, bf16, channels_last, device, rounds, steps, warmup, compile_=False):
    depth, width = ROWS[name]
    root, _ = load_config(_overrides(depth, width, size, batch, bf16, channels_last, device, compile_))
    trainer = Trainer(root, device=device)
    init = copy.deepcopy(trainer.engine.module).cpu()
    batch_ = next(iter(trainer.loader))
    bare = {cl: Bare(init, trainer, bf16, cl, device) for cl in (channels_last, not channels_last)}
    trainer_step = lambda b: trainer.train_step(b, 0.0)  # noqa: E731
    for _ in range(warmup):
        trainer_step(batch_)
        for b in bare.values():
            b.step(batch_)
    times = {"trainer": [], "bare": [], "bare_other": []}
    for _ in range(rounds):
        times["trainer"].append(_timed(trainer_step, batch_, steps, device))
        times["bare"].append(_timed(bare[channels_last].step, batch_, steps, device))
        times["bare_other"].append(_timed(bare[not channels_last].step, batch_, steps, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    images = batch
    row = {"model": name, "size": size, "batch": batch, "precision": "bf16" if bf16 else "fp32",
           "format": "channels_last" if channels_last else "contiguous", "compile": compile_,
           "trainer_img_s": images / med["trainer"], "bare_img_s": images / med["bare"],
           "bare_other_format_img_s": images / med["bare_other"]}
    row["trainer_over_bare"] = row["trainer_img_s"] / row["bare_img_s"]
    row["trainer_over_best_bare"] = row["trainer_img_s"] / max(row["bare_img_s"], row["bare_other_format_img_s"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["r50", "r50w2"], choices=sorted(ROWS))
    p.add_argument("--size", type=int, default=None, help="crop size (default: 64 for r50, 32 for r50w2)")
    p.add_argument("--batch", type=int, default=16, help="images per step (2 views each)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per timed round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also rows with config.MODEL.TORCH_COMPILE=True")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny: R18 at 32 px, 4 images, 1 round")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.smoke:
        a.rows, a.size, a.batch, a.rounds, a.steps, a.warmup = ["r18"], 32, 4, 1, 1, 1
    rows = []
    for name in a.rows:
        size = a.size or (64 if name == "r50" else 32)
        for bf16 in (False, True):
            for cl in (False, True):
                for comp in ((False, True) if a.compile else (False,)):
                    rows.append(run_row(name, size, a.batch, bf16, cl, device, a.rounds, a.steps, a.warmup, comp))
                    r = rows[-1]
                    print(f"{r['model']:6s} {r['size']:4d}px {r['precision']:5s} {r['format']:13s} "
                          f"{'compile ' if comp else ''}trainer {r['trainer_img_s']:8.2f} img/s  bare "
                          f"{r['bare_img_s']:8.2f}  bare other format {r['bare_other_format_img_s']:8.2f}  "
                          f"trainer/bare {r['trainer_over_bare']:.3f}  trainer/best bare "
                          f"{r['trainer_over_best_bare']:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
