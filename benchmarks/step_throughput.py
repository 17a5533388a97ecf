"""Step throughput: ``Trainer.train_step`` against a bare PyTorch loop, interleaved in one process.

For each row (model, resolution, precision, memory format) the script times the real trainer step (DDP engine
in one process: autocast, BatchNorm policy, LARC, loss, LR schedule, device-side loss statistics) and a bare loop
written here with the same model, SGD + LARC, SimCLR loss, plain ``torch.autocast`` and, when the row says so,
``channels_last`` model and inputs. Both run on the same prefetched batch, so data loading is excluded. Rounds
alternate trainer / bare / bare in the other memory format, and the median over rounds is reported; the ratio
trainer / bare(same format) and trainer / best bare (the faster memory format) are printed. Target: >= 0.97.

The bare loop gets exactly the trainer's inputs: with the two-stage data path (``config.DATA.TRAIN.
DEVICE_AUGMENTATION``: ``auto`` turns it on with CUDA, ``on`` forces it on a CPU) the loader delivers uint8 views
and their augmentation parameters, and the bare loop runs the same device stage (colour distortion, blur,
normalisation) before its forward. Its model is built fresh from the config and loaded with the trainer's
initial weights, so it never shares the trainer's ``torch.compile``-d blocks; it always runs eagerly (a row's
``compile`` says whether the trainer compiled). Every row records ``device_augmentation``, ``compile``,
``compile_backend`` and ``channels_last``.

    python benchmarks/step_throughput.py                       # R50 @ 64 px and R50-w2 @ 32 px, 16 images x 2 views
    python benchmarks/step_throughput.py --rows r50 --rounds 5 --steps 3
    python benchmarks/step_throughput.py --device cuda --size 224 --batch 64   # on a GPU
    python benchmarks/step_throughput.py --smoke                # tiny, seconds (used by the test suite)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaleclr import builders  # noqa: E402
from scaleclr.config import load_config  # noqa: E402
from scaleclr.losses import SimclrInfoNCELoss  # noqa: E402
from scaleclr.optim import LARC  # noqa: E402
from scaleclr.trainer import Trainer  # noqa: E402

ROWS = {"r50": (50, 1), "r50w2": (50, 2), "r18": (18, 1)}


def _overrides(depth, width, size, batch, bf16, channels_last, device, compile_, device_augmentation="auto",
               compile_backend="inductor"):
    o = ["config=test/integration_test/quick_simclr_synthetic", f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}",
         f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={width}", f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}",
         f"config.DATA.TRAIN.DATA_LIMIT={batch * 2}", f"config.DATA.TRAIN.SYNTHETIC_IMAGE_SIZE={size + size // 4}",
         f"config.DATA.TRAIN.TRANSFORMS.1.size={size}", "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=False",
         f"config.MODEL.CHANNELS_LAST={'on' if channels_last else 'off'}", f"config.MODEL.TORCH_COMPILE={compile_}",
         "config.CHECKPOINT.DIR=/tmp/scaleclr_step_throughput", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
         "config.LOG_FREQUENCY=100000", f"config.MACHINE.DEVICE={'gpu' if device.type == 'cuda' else 'cpu'}",
         "config.OPTIMIZER.num_epochs=1000", f"config.DATA.TRAIN.DEVICE_AUGMENTATION={device_augmentation}",
         f"config.MODEL.TORCH_COMPILE_BACKEND={compile_backend}"]
    if bf16:
        o += ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
              "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"]
    return o


def compiled_modules(model: torch.nn.Module) -> int:
    """How many submodules of ``model`` run ``torch.compile``-d code (``module.compile()`` in place, or an
    ``OptimizedModule`` wrapper); 0 for an eager model."""
    return sum(1 for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None
               or isinstance(m, torch._dynamo.eval_frame.OptimizedModule))


class Bare:
    """The loop a user would write: model, SGD + LARC, the SimCLR loss, autocast, optional channels_last, and
    (two-stage data path) the trainer's device augmentation stage on the copied uint8 views.

    Args:
        init: the trainer's initial state dict (before its first step), loaded into a freshly built model.
    """

    def __init__(self, init, trainer: Trainer, bf16: bool, channels_last: bool, device):
        self.model = builders.build_model(trainer.c)  # fresh: never a copy of the trainer's compiled blocks
        self.model.load_state_dict(init)
        self.model.to(device)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        c = trainer.c.OPTIMIZER
        sgd = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=c.momentum, weight_decay=c.weight_decay)
        lc = c.larc_config
        self.opt = LARC(sgd, trust_coefficient=lc.trust_coefficient, clip=lc.clip, eps=lc.eps)
        self.loss = SimclrInfoNCELoss(temperature=trainer.c.LOSS.simclr_info_nce_loss.temperature)
        self.stage = trainer.device_stage  # a stateless callable: enabled exactly when the trainer's is
        self.bf16, self.device = bf16, device

    def views(self, batch):
        """``[V*B, 3, H, W]`` float views on the device in this loop's memory format."""
        if not self.stage.enabled:
            return batch["data"].to(self.device, non_blocking=True, memory_format=self.fmt)
        params = batch["aug_params"]
        x = self.stage({"data": batch["data"].to(self.device, non_blocking=True),
                        "aug_params": params.to(self.device, non_blocking=True), "aug_params_host": params})
        return x.contiguous(memory_format=self.fmt)

    def step(self, batch):
        x = self.views(batch)
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


def run_row(name, size, batch, bf16, channels_last, device, rounds, steps, warmup, compile_=False,
            device_augmentation="auto", compile_backend="inductor"):
    """One row: trainer and bare loops timed on one prefetched batch (see the module docstring).

    ``device_augmentation``: ``config.DATA.TRAIN.DEVICE_AUGMENTATION`` (``auto``: on with CUDA; ``on`` forces
    the two-stage path on a CPU). ``compile_backend``: ``inductor``, or ``aot_eager`` (CPU smoke runs).
    """
    depth, width = ROWS[name]
    root, _ = load_config(_overrides(depth, width, size, batch, bf16, channels_last, device, compile_,
                                     device_augmentation, compile_backend))
    trainer = Trainer(root, device=device)
    init = {k: v.detach().cpu().clone() for k, v in trainer.engine.module.state_dict().items()}
    batch_ = next(iter(trainer.loader))
    bare = {cl: Bare(init, trainer, bf16, cl, device) for cl in (channels_last, not channels_last)}
    for b in bare.values():  # the bare loop must run its own eager model, never the trainer's compiled blocks
        assert compiled_modules(b.model) == 0, f"bare model has {compiled_modules(b.model)} compiled modules"
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
           "compile_backend": compile_backend if compile_ else None, "channels_last": channels_last,
           "device_augmentation": bool(trainer.device_stage.enabled),
           "trainer_compiled_modules": compiled_modules(trainer.engine.module),
           "bare_compiled_modules": compiled_modules(bare[channels_last].model),
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
    p.add_argument("--device-augmentation", default="auto", choices=["auto", "on", "off"],
                   help="config.DATA.TRAIN.DEVICE_AUGMENTATION (auto: on with CUDA)")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny: R18 at 32 px, 4 images, 1 round, device "
                   "augmentation on")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.smoke:
        a.rows, a.size, a.batch, a.rounds, a.steps, a.warmup = ["r18"], 32, 4, 1, 1, 1
        a.device_augmentation = "on"
    rows = []
    for name in a.rows:
        size = a.size or (64 if name == "r50" else 32)
        for bf16 in (False, True):
            for cl in (False, True):
                for comp in ((False, True) if a.compile else (False,)):
                    rows.append(run_row(name, size, a.batch, bf16, cl, device, a.rounds, a.steps, a.warmup, comp,
                                        a.device_augmentation, a.compile_backend))
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
