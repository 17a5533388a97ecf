"""Every GPU check and measurement of the project in one prepared script: under 8 minutes on one H100/H200.

Run it once when a GPU is lent (``python benchmarks/gpu_check.py``); it writes a JSON (``--out``) and prints a
short table. Each section is independent: a failure is recorded in the JSON (``error``) and the next section runs;
the exit status is 1 when any section failed. A section that would overrun the 8-minute budget (its expected
seconds, below, added to the time spent) is recorded as ``{"skipped": "time budget"}``.

0. ``tests`` (~200 s, capped at 240 s): the GPU pass, ``make test-gpu``'s pytest command (``-m gpu``) in a
   subprocess; the JSON holds ``passed``/``failed``/``errors``/``skipped``, the failing test ids with their first
   message line, and the skip reasons (from pytest's ``--junitxml``).
1. ``loss`` (~80 s): Triton InfoNCE against the float64 reference (values, gradients, determinism), then reference /
   streaming / triton forward + backward time and peak memory at 2N = 8192 .. 65536, bf16 and fp32
   (``benchmarks/loss_gpu.py``).
2. ``step`` (~100 s): the trainer's img/s for R50 at 224 px, bf16, channels_last, with the two-stage data path
   (``DEVICE_AUGMENTATION=auto``: on with CUDA), without and with ``torch.compile``, against a bare loop that runs
   the same device stage on its own eager model (``benchmarks/step_throughput.py``). Each row records
   ``device_augmentation``, ``compile``, ``channels_last`` and the compiled-module counts of both models.
3. ``device_aug`` (~15 s): the device augmentation stage's views/s at 224 px and its CUDA-vs-CPU parity
   (``benchmarks/data_pipeline.py``).
4. ``sync_bn`` (~5 s): SyncBatchNorm's sync path (not the plain-BN fallback a one-rank module takes) against
   float64 batch norm of the whole batch, fp32 and bf16 input with fp32 parameters: torch's autograd function on
   the 1-rank NCCL group, torch's kernels on 2 emulated ranks of unequal size, scaleclr's function
   (``benchmarks/sync_bn_check.py``).
5. ``engine_memory`` (~60 s): peak GPU memory of two R50-w2 training steps per engine (DDP, FSDP, ZeRO-1/2/3) in
   one process on ``cuda:0``: ``torch.cuda.max_memory_allocated`` over the second step (peak stats reset after
   the first, so the momentum exists, as in steady training) beside the memory planner's prediction for the same
   config (``scaleclr.plan.predict``, world 1): ``predicted_mib`` and ``predicted_over_measured``.

``--cpu-smoke`` runs every section at toy sizes on the CPU (~1 minute; the test suite runs it so the script
cannot rot): the GPU pass's pytest command on CPU (every test skips), the step rows with the two-stage path forced
on and with ``torch.compile`` (backend ``aot_eager``), scaleclr's sync function, and all five engines with their
planner predictions (built on CPU; the comparison needs a GPU: ``"comparison": "skipped: no CUDA"``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

BUDGET_S = 480  # the whole script, on one H100/H200
EXPECTED_S = {"tests": 200, "loss": 80, "step": 100, "device_aug": 15, "sync_bn": 5, "engine_memory": 60}
TESTS_TIMEOUT_S = 240
# `make test-gpu`'s pytest command (Makefile), run with this interpreter
GPU_PASS = ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]


def _section(results, name, fn, *args, started=None, smoke=False):
    if not smoke and started is not None and time.perf_counter() - started + EXPECTED_S[name] > BUDGET_S:
        results[name] = {"skipped": f"time budget: {BUDGET_S} s in all, {EXPECTED_S[name]} s expected for it"}
        print(f"[{name}] skipped (time budget)", flush=True)
        return
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


def junit_summary(path) -> dict:
    """pytest's ``--junitxml`` file -> counts, failing test ids (with their first message line), skip reasons."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": [], "skip_reasons": {}}
    reasons = Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case if child.tag in ("failure", "error", "skipped")}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            out["failed" if tag == "failure" else "errors"] += 1
            out["failing"].append({"id": test_id, "kind": tag,
                                   "message": (kinds[tag].get("message") or "").splitlines()[:1]})
        elif "skipped" in kinds:
            out["skipped"] += 1
            reasons[kinds["skipped"].get("message") or ""] += 1
        else:
            out["passed"] += 1
    out["skip_reasons"] = dict(reasons)
    return out


def tests_section(smoke: bool, out_dir: Path):
    """The GPU pass (``make test-gpu``) in a subprocess; its JUnit XML summarised. On CPU (smoke) every test skips;
    only tests/test_gpu.py is collected there (the whole folder on a GPU)."""
    xml = out_dir / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, *GPU_PASS, f"--junitxml={xml}", "tests/test_gpu.py" if smoke else "tests"]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        rc, tail = r.returncode, (r.stdout + r.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", f"killed after {TESTS_TIMEOUT_S} s\n{(e.stdout or b'')[-3000:]!r}"
    out = {"command": " ".join(cmd[1:]), "exit_status": rc, "seconds": round(time.perf_counter() - t, 1)}
    if xml.exists():
        out.update(junit_summary(xml))
    # 5: no test selected (nothing carries the mark): not a failure
    if rc not in (0, 5) or out.get("failed") or out.get("errors"):
        out["error"] = f"GPU pass: exit status {rc}, {out.get('failed', '?')} failed, {out.get('errors', '?')} errors"
        out["output_tail"] = tail
    return out


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

    rows = []
    for comp in (False, True):
        if smoke:  # the two-stage path forced on (auto is off on a CPU), compile without code generation
            rows.append(step_throughput.run_row("r18", 16, 2, True, True, device, rounds=1, steps=1, warmup=0,
                                                compile_=comp, device_augmentation="on", compile_backend="aot_eager"))
        else:
            rows.append(step_throughput.run_row("r50", 224, 64, True, True, device, rounds=3, steps=5, warmup=3,
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
    """SyncBatchNorm's sync path vs float64 batch norm of the whole batch (``benchmarks/sync_bn_check.py``); on CPU
    (smoke) scaleclr's function only (torch's sync kernels are CUDA-only)."""
    import torch.distributed as dist
    from torch import nn

    import sync_bn_check as sbc

    _one_process_group(device)
    group = dist.group.WORLD
    n, c, hw = (8, 16, 8) if smoke else (64, 64, 16)
    out = {"group_size": dist.get_world_size(group), "checks": {}}
    for dtype in (torch.float32, torch.bfloat16):
        case = sbc.make_case(n, c, hw, dtype, device)
        ref = sbc.reference64(case)
        runs = {"scaleclr": lambda: sbc.run_scaleclr(case, group)}
        if device.type == "cuda":
            runs["torch"] = lambda: sbc.run_torch(case, group)
            runs["torch_emulated_ranks_3_5"] = lambda: sbc.run_emulated(case, (3 * n // 8, 5 * n // 8))
        for name, run in runs.items():
            out["checks"][f"{name}_{str(dtype)[6:]}"] = sbc.compare(run(), ref, dtype)
    # what a one-rank module does instead (the fallback this section avoids)
    module = nn.SyncBatchNorm(c) if device.type == "cuda" else None
    if module is not None:
        y = module.to(device)(case["x"].float())
        out["module_one_rank_grad_fn"] = type(y.grad_fn).__name__
    bad = [k for k, v in out["checks"].items() if not v["ok"]]
    if bad:
        out["error"] = f"sync path off or beyond its limits: {bad}"
    return out


def engine_memory_section(smoke: bool, device):
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    _one_process_group(device)
    engines = {"ddp": [], "fsdp": ["config.DISTRIBUTED.ENGINE=fsdp"]}
    for stage in (1, 2, 3):
        engines[f"zero{stage}"] = ["config.DISTRIBUTED.ENGINE=deepspeed",
                                   f"config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero{stage}.json"]
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
            from scaleclr.plan import predict
            pred = predict(root, name, device_type=device.type, world=1)["peak_bytes"] / 2 ** 20
            tr = Trainer(root, device=device)
            batch_ = next(iter(tr.loader))
            tr.train_step(batch_, 0.0)  # warm-up: momentum allocated, as in the steady state the planner predicts
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if not smoke:
                tr.train_step(batch_, 0.0)
            row = {"predicted_mib": pred}
            if device.type == "cuda":
                torch.cuda.synchronize()
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
                row["predicted_over_measured"] = pred / row["peak_mib"]
            else:
                row.update(peak_mib=None, comparison="skipped: no CUDA (the prediction was built)")
            out[name] = row
            del tr
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        gc.collect()
    failed = [k for k, v in out.items() if "error" in v]
    if failed:
        out["error"] = f"engines failed: {failed}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (the test suite runs this)")
    p.add_argument("--out", default="benchmarks/gpu_check.json")
    p.add_argument("--sections", nargs="+", default=list(EXPECTED_S), choices=list(EXPECTED_S))
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke for the CPU check of this script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda:0")  # an index: DeepSpeed and DDP read it
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
               "torch": torch.__version__, "smoke": smoke}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fns = {"tests": lambda: tests_section(smoke, Path(a.out).resolve().parent), "loss": lambda: loss_section(smoke),
           "step": lambda: step_section(smoke, device),
           "device_aug": lambda: device_aug_section(smoke, device), "sync_bn": lambda: sync_bn_section(smoke, device),
           "engine_memory": lambda: engine_memory_section(smoke, device)}
    for name in a.sections:
        _section(results, name, fns[name], started=started, smoke=smoke)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    Path(a.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {a.out}")
    print(summary(results))
    return 0 if not any(isinstance(v, dict) and "error" in v for v in results.values()) else 1


def summary(r) -> str:
    lines = [f"device: {r['device']}, torch {r['torch']}, {r.get('total_seconds', '?')} s"]
    t = r.get("tests", {})
    if "passed" in t:
        lines.append(f"GPU pass: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} "
                     f"skipped" + "".join(f"\n  FAILED {f['id']}: {' '.join(f['message'])}" for f in t["failing"]))
    loss = r.get("loss", {})
    for row in loss.get("rows", []):
        t = row.get("triton", {})
        ref = row.get("reference", {})
        if "s" in t and "s" in ref:
            lines.append(f"loss 2N={row['n']} {row['dtype']} {row['matmul_precision']}: triton {t['s'] * 1e3:.2f} ms "
                         f"{t['mb']:.0f} MB, reference/triton time {ref['s'] / t['s']:.2f}x memory "
                         f"{ref['mb'] / max(t['mb'], 1e-3):.0f}x")
    for row in r.get("step", []) if isinstance(r.get("step"), list) else []:
        lines.append(f"step {row['model']} {row['size']}px {row['precision']} {row['format']} compile={row['compile']} "
                     f"device_augmentation={row['device_augmentation']}: "
                     f"{row['trainer_img_s']:.1f} img/s, trainer/bare {row['trainer_over_bare']:.3f}")
    da = r.get("device_aug", {})
    if "views_per_s" in da:
        lines.append(f"device augmentation: {da['views_per_s']:.0f} views/s at {da['size']} px")
    for name, chk in (r.get("sync_bn", {}).get("checks") or {}).items():
        worst = max((v["err"] / v["limit"], k) for k, v in chk.items() if isinstance(v, dict))
        lines.append(f"sync_bn {name}: {chk['grad_fn']}, worst {worst[1]} at {worst[0]:.2f} of its limit")
    for name, m in (r.get("engine_memory") or {}).items():
        if isinstance(m, dict) and m.get("peak_mib") is not None:
            lines.append(f"engine {name}: peak {m['peak_mib']:.0f} MiB, planner {m['predicted_mib']:.0f} MiB "
                         f"({m['predicted_over_measured']:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
