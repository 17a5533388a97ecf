"""GPU benchmark and checks of the SimCLR loss: triton vs reference vs streaming (prepared for a lent GPU).

On CUDA:
1. checks (a few seconds): triton against the float64 dense reference at N = 1000 (not a tile multiple), ieee
   (tight) and tf32 (loose) for 2 and 6 crops, T in {0.02, 0.1}; bitwise determinism of two runs.
2. benchmark: ``SimclrInfoNCELoss`` forward + backward on a ``[N, 128]`` embedding for N = 8192 .. 65536, input
   dtype bf16 and fp32; median time over ``--reps`` runs via CUDA events, peak memory above the inputs via
   ``torch.cuda.max_memory_allocated``; ratios against the reference; and the brief's throughput floor (6.7):
   fwd + bwd evaluate ``2 N^2`` exps (one per logit per pass) at ~3.9e12 exp/s on H100/H200 SXM (FlashAttention-3
   paper) and ``6 N^2 D`` GEMM FLOPs (fwd ``S``, bwd recompute + gradient GEMM) at 989 TFLOPS (bf16/tf32 dense
   tensor cores, tf32 half of that); the floor is the larger of the two.
Without CUDA it says so and runs the CPU part only (reference vs streaming at small N).

Usage::

    python benchmarks/loss_gpu.py                  # checks + full table (~2-4 min on one H100/H200)
    python benchmarks/loss_gpu.py --sizes 8192 16384 --reps 5 --skip-checks
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from scaleclr.losses import SimclrInfoNCELoss, info_nce_dense

EXP_PER_S = 3.9e12          # H100 SXM special-function throughput (FlashAttention-3, arXiv 2407.08608)
TF32_FLOPS = 494e12         # H100 SXM dense tf32 tensor-core peak
IEEE_FLOPS = 67e12          # H100 SXM fp32 (non tensor core) peak
DIM = 128


def _dense64(h, t, c):
    z = F.normalize(h.double(), dim=1)
    return info_nce_dense(z, z, temperature=t, num_crops=c)


def checks() -> bool:
    """Triton vs float64 reference on the GPU; returns True when all pass (prints one line per check)."""
    from scaleclr.losses.infonce_triton import info_nce_triton

    ok = True
    torch.manual_seed(0)
    for c in (2, 6):
        for t in (0.02, 0.1):
            h = torch.randn(c * (1000 // c), DIM, device="cuda", dtype=torch.float64)
            hr = h.clone().requires_grad_()
            want = _dense64(hr, t, c)
            (want_g,) = torch.autograd.grad(want, hr)
            for prec, tol in (("ieee", 1e-5), ("tf32", 5e-3)):
                h32 = h.float().requires_grad_()
                got = info_nce_triton(F.normalize(h32, dim=1), temperature=t, num_crops=c, input_precision=prec)
                (g,) = torch.autograd.grad(got, h32)
                err_v = abs(got.item() - want.item()) / abs(want.item())
                err_g = ((g.double() - want_g).abs().max() / want_g.abs().max()).item()
                good = err_v < tol and err_g < 10 * tol
                ok &= good
                print(f"check C={c} T={t} {prec:5s}: rel loss err {err_v:.2e}, rel grad err {err_g:.2e} "
                      f"{'ok' if good else 'FAIL'}")
    h = torch.randn(4096, DIM, device="cuda").requires_grad_()
    runs = []
    for _ in range(2):
        loss = SimclrInfoNCELoss(0.1, impl="triton")(h)
        (g,) = torch.autograd.grad(loss, h)
        runs.append((loss.detach().clone(), g.clone()))
    det = torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    ok &= det
    print(f"check bitwise determinism (N=4096): {'ok' if det else 'FAIL'}")
    return ok


def bench_cuda(impl: str, n: int, dtype: torch.dtype, reps: int) -> dict:
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, DIM, device="cuda", generator=g).to(dtype).requires_grad_()
    loss_fn = SimclrInfoNCELoss(0.1, impl=impl)
    try:
        loss_fn(h).backward()                            # warm-up (compiles triton kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            h.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss_fn(h).backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return {"s": statistics.median(times), "mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        del h
        torch.cuda.empty_cache()


def floor_s(n: int, tf32: bool) -> float:
    return max(2 * n * n / EXP_PER_S, 6 * n * n * DIM / (TF32_FLOPS if tf32 else IEEE_FLOPS))


def run_gpu(args) -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if not args.skip_checks:
        torch.set_float32_matmul_precision("highest")
        if not checks():
            print("CHECKS FAILED", file=sys.stderr)
    for prec in args.precisions:
        torch.set_float32_matmul_precision(prec)
        tf32 = prec != "highest"
        print(f"\nfwd+bwd, D={DIM}, T=0.1, float32_matmul_precision={prec!r} (triton tl.dot: "
              f"{'tf32' if tf32 else 'ieee'}), median of {args.reps}; MB = peak allocated above inputs\n")
        print("| N | dtype | reference ms | reference MB | streaming ms | streaming MB | triton ms | triton MB "
              "| ref/triton time | ref/triton mem | floor ms | triton/floor |")
        print("|" + "---|" * 12)
        for n in args.sizes:
            for dtype in (torch.bfloat16, torch.float32):
                r = {impl: bench_cuda(impl, n, dtype, args.reps) for impl in ("reference", "streaming", "triton")}

                def cell(x, k, scale=1.0, fmt="{:.2f}"):
                    return "OOM" if "oom" in x else fmt.format(x[k] * scale)

                ref, tri = r["reference"], r["triton"]
                both = "oom" not in ref and "oom" not in tri
                fl = floor_s(n, tf32)
                print(f"| {n} | {str(dtype)[6:]} | {cell(ref, 's', 1e3)} | {cell(ref, 'mb', fmt='{:.0f}')} | "
                      f"{cell(r['streaming'], 's', 1e3)} | {cell(r['streaming'], 'mb', fmt='{:.0f}')} | "
                      f"{cell(tri, 's', 1e3)} | {cell(tri, 'mb', fmt='{:.0f}')} | "
                      f"{(ref['s'] / tri['s']) if both else float('nan'):.2f}x | "
                      f"{(ref['mb'] / max(tri['mb'], 1e-3)) if both else float('nan'):.0f}x | {fl * 1e3:.2f} | "
                      f"{(tri['s'] / fl) if 'oom' not in tri else float('nan'):.1f}x |", flush=True)


def run_cpu(args) -> None:
    print("no CUDA device: running the CPU part only (reference vs streaming; triton needs a GPU, or "
          "TRITON_INTERPRET=1 for correctness tests, see tests/test_triton_loss.py)")
    print("\n| N | reference ms | streaming ms | ref/streaming |\n|---|---|---|---|")
    for n in args.cpu_sizes:
        h = torch.randn(n, DIM).requires_grad_()
        res = {}
        for impl in ("reference", "streaming"):
            fn = SimclrInfoNCELoss(0.1, impl=impl)
            fn(h).backward()
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn(h).backward()
                ts.append(time.perf_counter() - t0)
            res[impl] = statistics.median(ts)
        print(f"| {n} | {res['reference'] * 1e3:.1f} | {res['streaming'] * 1e3:.1f} | "
              f"{res['reference'] / res['streaming']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--cpu-sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--precisions", nargs="+", default=["high", "highest"],
                   help="torch.set_float32_matmul_precision values to run (high = tf32, highest = ieee)")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args()
    if torch.cuda.is_available():
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
