"""Activation memory of a bf16 SimCLR forward under the two BatchNorm policies, measured in one process.

* ``fp32 BN`` (scaleclr before issue 11): every BatchNorm input cast to fp32, so BN and the ReLU after it compute
  and keep fp32 activations;
* ``native`` (now, what ``torch.autocast`` does): BN keeps fp32 weights and statistics, its activations stay bf16.

Measured: the bytes autograd saves for backward during one forward (``torch.autograd.graph.saved_tensors_hooks``,
each storage counted once), i.e. the activation memory the backward needs; plus the step time of forward +
backward, interleaved. The ratio native / fp32-BN is printed.

    python benchmarks/bn_precision_memory.py                   # R50, 64 px, 16 images x 2 views, CPU
    python benchmarks/bn_precision_memory.py --depth 50 --width 2 --size 96 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaleclr.models import ResNet, SimCLRModel, build_heads  # noqa: E402


def _fp32_bn_hook(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def build(depth, width, fp32_bn):
    torch.manual_seed(0)
    trunk = ResNet(depth=depth, width_multiplier=width)
    f = trunk.num_features
    model = SimCLRModel(trunk, build_heads([["mlp", {"dims": [f, 2048], "use_relu": True,
                                                     "skip_last_layer_relu_bn": False}], ["mlp", {"dims": [2048, 128]}]]))
    if fp32_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.register_forward_pre_hook(_fp32_bn_hook)
    return model


def saved_bytes(model, x, device):
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z = model(x)
    z.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return total[0]


def step_time(model, x, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        z = model(x)
    z.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="views per step (16 images x 2 views)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    models = {name: build(a.depth, a.width, fp32_bn).to(device) for name, fp32_bn in (("fp32_bn", True),
                                                                                      ("native", False))}
    mem = {name: saved_bytes(m, x, device) for name, m in models.items()}
    times = {name: [] for name in models}
    for _ in range(a.rounds):
        for name, m in models.items():
            times[name].append(step_time(m, x, device))
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"R{a.depth}-w{a.width}, {a.size} px, {a.batch} views, bf16 autocast, {device}")
    print("| BatchNorm policy | saved activations (MiB) | fwd+bwd s |")
    print("|---|---:|---:|")
    for name in models:
        print(f"| {name} | {mem[name] / 2**20:.1f} | {t[name]:.3f} |")
    print(f"native / fp32_bn: activation memory {mem['native'] / mem['fp32_bn']:.3f}, "
          f"time {t['native'] / t['fp32_bn']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
