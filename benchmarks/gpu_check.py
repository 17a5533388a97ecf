"""Every GPU measurement of the project in one prepared script (under 8 minutes on one H100/H200).

Run it once when a GPU is lent (``python benchmarks/gpu_check.py``); it writes a JSON (``--out``) and prints a
short table. Each section is independent: a failure is recorded in the JSON and the next section runs.

1. ``loss``: Triton InfoNCE against the float64 reference (values, gradients, determinism), then reference /
   streaming / triton forward + backward time and peak memory at 2N = 8192 .. 65536, bf16 and fp32
   (``benchmarks/loss_gpu.py``).
2. ``step``: the trainer's img/s for R50 at 224 px, bf16, channels_last, with and without ``torch.compile``,
   against a bare loop (``benchmarks/step_throughput.py``).
3. ``device_aug``: the device augmentation stage's views/s at 224 px and its CUDA-vs-CPU parity
   (``benchmarks/data_pipeline.py``).
4. ``sync_bn``: ``torch.nn.SyncBatchNorm`` on CUDA in a one-process group under the BatchNorm policy (bf16
   input, fp32 weights and statistics): forward/backward against plain BatchNorm.
5. ``engine_memory``: peak GPU memory of two R50-w2 training steps per engine (DDP, FSDP, ZeRO-1/2/3) in one
   process.

``--cpu-smoke`` runs every section at toy sizes on the CPU (seconds; the test suite runs it so the script
cannot rot).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _section(results, name, fn, *args):
    t = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as e:  # a failing section is reported, the others still run
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    results[name + "_seconds"] = round(time.perf_counter() - t, 1)
    print(f"[{name}] {results[name + '_seconds']} s" + (f" ERROR {results[name]['error']}"
                                                          if "error" in results[name] else ""), flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loss_section(smoke: bool):
    import loss_gpu

    out = {"rows": []}
    if smoke:
        from scaleclr.losses import SimclrInfoNCELoss
        h = torch.randn(256, loss_gpu.DIM).requires_grad_()
        ref = SimclrInfoNCELoss(0.1, impl="reference")(h)
        (g_ref,) = torch.autograd.grad(ref, h)
        got = SimclrInfoNCELoss(0.1, impl="streaming")(h)
        (g,) = torch.autograd.grad(got, h)
        out["streaming_vs_reference"] = {"loss_rel": abs(float(got - ref)) / abs(float(ref)),
                                         "grad_rel": float((g - g_ref).abs().max() / g_ref.abs().max())}
        return out
    torch.set_float32_matmul_precision("highest")
    out["checks_ok"] = bool(loss_gpu.checks())
    for prec in ("high", "highest"):
        torch.set_float32_matmul_precision(prec)
        for n in (8192, 16384, 32768, 65536):
            for dtype in (torch.bfloat16, torch.float32):
                r = {impl: loss_gpu.bench_cuda(impl, n, dtype, 3) for impl in ("reference", "streaming", "triton")}
                out["rows"].append({"n": n, "dtype": str(dtype)[6:], "matmul_precision": prec, **r,
                                    "floor_s": loss_gpu.floor_s(n, prec != "highest")})
    return out


def step_section(smoke: bool, device):
    import step_throughput

    if smoke:
        return [step_throughput.run_row("r18", 16, 2, True, True, device, rounds=1, steps=1, warmup=0)]
    rows = []
    for comp in (False, True):
        rows.append(step_throughput.run_row("r50", 224, 64, True, True, device, rounds=5, steps=5, warmup=3,
                                            compile_=comp))
    return rows


def device_aug_section(smoke: bool, device):
    import data_pipeline

    views, size = (16, 32) if smoke else (256, 224)
    out = {"views_per_s": data_pipeline.benchmark_device_stage(device, views=views, size=size),
           "views": views, "size": size}
    if device.type == "cuda":
        out["max_abs_diff_vs_cpu_uint8_levels"] = data_pipeline.device_stage_parity(device)
    return out


def _one_process_group(device):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def sync_bn_section(smoke: bool, device):
    """torch's SyncBatchNorm (CUDA) or scaleclr's (CPU smoke) vs BatchNorm2d, bf16 activations, fp32 weights."""
    from torch import nn

    from scaleclr.distributed.sync_bn import convert_sync_batchnorm

    _one_process_group(device)
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(64).to(device)
    sync = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(64)), "pytorch", device=device).to(device)
    sync[0].load_state_dict(ref.state_dict())
    x = torch.randn(8 if smoke else 64, 64, 16, 16, device=device).bfloat16()
    out = {}
    for name, m in (("batchnorm", ref), ("syncbn", sync)):
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = m(xi)
        y.float().square().mean().backward()
        out[name] = {"y": y.detach().float(), "dx": xi.grad.float(), "out_dtype": str(y.dtype),
                     "running_var_dtype": str(m.running_var.dtype if name == "batchnorm" else m[0].running_var.dtype)}
    return {"type": type(sync[0]).__name__, "out_dtype": out["syncbn"]["out_dtype"],
            "running_var_dtype": out["syncbn"]["running_var_dtype"],
            "max_abs_y_diff": float((out["syncbn"]["y"] - out["batchnorm"]["y"]).abs().max()),
            "max_abs_dx_diff": float((out["syncbn"]["dx"] - out["batchnorm"]["dx"]).abs().max())}


def engine_memory_section(smoke: bool, device):
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    _one_process_group(device)
    engines = {"ddp": [], "fsdp": ["config.DISTRIBUTED.ENGINE=fsdp"]}
    for stage in (1, 2, 3):
        engines[f"zero{stage}"] = ["config.DISTRIBUTED.ENGINE=deepspeed",
                                   f"config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero{stage}.json"]
    if smoke:
        engines = {k: v for k, v in engines.items() if k in ("ddp", "fsdp")}
    depth, width, size, batch = (18, 1, 16, 2) if smoke else (50, 2, 160, 32)
    out = {}
    for name, extra in engines.items():
        root, _ = load_config(["config=test/integration_test/quick_simclr_synthetic",
                               f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}", f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={width}",
                               f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}", f"config.DATA.TRAIN.DATA_LIMIT={batch}",
                               f"config.DATA.TRAIN.SYNTHETIC_IMAGE_SIZE={size + size // 4}",
                               f"config.DATA.TRAIN.TRANSFORMS.1.size={size}", "config.MODEL.AMP_PARAMS.USE_AMP=True",
                               "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch", "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16",
                               "config.CHECKPOINT.DIR=/tmp/scaleclr_gpu_check", "config.LOG_FREQUENCY=1000",
                               "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
                               f"config.MACHINE.DEVICE={'gpu' if device.type == 'cuda' else 'cpu'}", *extra])
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            tr = Trainer(root, device=device)
            batch_ = next(iter(tr.loader))
            for _ in range(1 if smoke else 2):
                tr.train_step(batch_, 0.0)
            out[name] = {"peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}
            del tr
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (the test suite runs this)")
    p.add_argument("--out", default="benchmarks/gpu_check.json")
    p.add_argument("--sections", nargs="+", default=["loss", "step", "device_aug", "sync_bn", "engine_memory"])
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU check of this script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
               "torch": torch.__version__, "smoke": smoke}
    fns = {"loss": lambda: loss_section(smoke), "step": lambda: step_section(smoke, device),
           "device_aug": lambda: device_aug_section(smoke, device), "sync_bn": lambda: sync_bn_section(smoke, device),
           "engine_memory": lambda: engine_memory_section(smoke, device)}
    for name in a.sections:
        _section(results, name, fns[name])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {a.out}")
    print(summary(results))
    return 0 if not any(isinstance(v, dict) and "error" in v for v in results.values()) else 1


def summary(r) -> str:
    lines = [f"device: {r['device']}, torch {r['torch']}"]
    loss = r.get("loss", {})
    for row in loss.get("rows", []):
        t = row.get("triton", {})
        ref = row.get("reference", {})
        if "s" in t and "s" in ref:
            lines.append(f"loss 2N={row['n']} {row['dtype']} {row['matmul_precision']}: triton {t['s'] * 1e3:.2f} ms "
                         f"{t['mb']:.0f} MB, reference/triton time {ref['s'] / t['s']:.2f}x memory "
                         f"{ref['mb'] / max(t['mb'], 1e-3):.0f}x")
    for row in r.get("step", []) if isinstance(r.get("step"), list) else []:
        lines.append(f"step {row['model']} {row['size']}px {row['precision']} {row['format']} compile={row['compile']}: "
                     f"{row['trainer_img_s']:.1f} img/s, trainer/bare {row['trainer_over_bare']:.3f}")
    da = r.get("device_aug", {})
    if "views_per_s" in da:
        lines.append(f"device augmentation: {da['views_per_s']:.0f} views/s at {da['size']} px")
    sb = r.get("sync_bn", {})
    if "type" in sb:
        lines.append(f"sync_bn {sb['type']}: out {sb['out_dtype']}, running_var {sb['running_var_dtype']}, "
                     f"max |dy| {sb['max_abs_y_diff']:.2e}, max |dx| {sb['max_abs_dx_diff']:.2e}")
    for name, m in (r.get("engine_memory") or {}).items():
        if isinstance(m, dict) and m.get("peak_mib") is not None:
            lines.append(f"engine {name}: peak {m['peak_mib']:.0f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
