"""CPU memory and time of the SimCLR loss: dense reference vs streaming (vs lightly if installed).

Each (impl, 2N) case runs forward + backward of ``SimclrInfoNCELoss`` on a ``[2N, 128]`` fp32 embedding in a
fresh subprocess. Memory is measured inside the child: after a small warm-up (imports, BLAS buffers) and after
creating the inputs, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5, so ``VmHWM`` restarts
at the current RSS) and the baseline ``VmRSS`` is read; after the first forward + backward the extra memory is
``VmHWM - baseline`` (falls back to ``ru_maxrss`` where clear_refs is not writable). Time is the median over
``--reps`` further forward + backward runs (wall clock, ``--threads`` intra-op threads).

Usage::

    python benchmarks/loss_memory.py                      # 2N = 4096 .. 32768, markdown table on stdout
    python benchmarks/loss_memory.py --sizes 4096 8192 --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import reset_peak, status_kb  # noqa: E402

DIM = 128
# Measured: the reference peaks at ~4 fp32 [2N, 2N] matrices (logits, log-sum-exp temporaries, gradient), i.e.
# 4.1 GB at 2N = 16384 and 16.4 GB at 2N = 32768 (skipped by default: above --max-ref-gb).
REF_BYTES_PER_LOGIT = 16.1




def _make_loss(impl: str, temperature: float):
    if impl == "lightly":
        from lightly.loss import NTXentLoss

        ntx = NTXentLoss(temperature=temperature, gather_distributed=False)
        return lambda h: ntx(h[: h.shape[0] // 2], h[h.shape[0] // 2:])
    from scaleclr.losses import SimclrInfoNCELoss

    return SimclrInfoNCELoss(temperature, impl=impl)


def child(impl: str, rows: int, reps: int, threads: int, temperature: float) -> dict:
    """Run one case in this process; returns a JSON-able dict."""
    import torch

    torch.set_num_threads(threads)
    loss_fn = _make_loss(impl, temperature)
    warm = torch.randn(256, DIM, requires_grad=True)
    loss_fn(warm).backward()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, DIM, generator=g).requires_grad_()
    reset_ok = reset_peak()
    base_kb = status_kb("VmRSS")
    t0 = time.perf_counter()
    loss = loss_fn(h)
    loss.backward()
    first_s = time.perf_counter() - t0
    peak_kb = status_kb("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        h.grad = None
        t0 = time.perf_counter()
        loss_fn(h).backward()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "rows": rows, "extra_mb": (peak_kb - base_kb) / 1024.0, "loss": float(loss),
            "first_s": first_s, "median_s": statistics.median(times) if times else first_s,
            "min_s": min(times) if times else first_s, "peak_method": "VmHWM" if reset_ok else "ru_maxrss"}


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) * 1024


def run_case(impl: str, rows: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(rows), "--reps", str(args.reps),
           "--threads", str(args.threads), "--temperature", str(args.temperature)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"impl": impl, "rows": rows, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="2N rows")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--max-ref-gb", type=float, default=16.0, help="skip reference cases estimated above this")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "ROWS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.reps, args.threads, args.temperature)))
        return

    impls = ["reference", "streaming"]
    try:
        import lightly  # noqa: F401
        impls.append("lightly")
    except ImportError:
        print("note: `import lightly` failed; lightly's NTXentLoss(gather_distributed=False) is skipped",
              file=sys.stderr)
    results = {}
    for rows in args.sizes:
        for impl in impls:
            if impl != "streaming":
                est = REF_BYTES_PER_LOGIT * rows * rows
                limit = min(args.max_ref_gb * 2**30, 0.8 * _mem_available_bytes())
                if est > limit:
                    results[impl, rows] = {"skipped": f"est. {est / 2**30:.1f} GB > {limit / 2**30:.1f} GB"}
                    print(f"skip {impl} 2N={rows}: {results[impl, rows]['skipped']}", file=sys.stderr)
                    continue
            r = run_case(impl, rows, args)
            results[impl, rows] = r
            print(json.dumps(r), file=sys.stderr)

    def cell(r, key, fmt):
        if "skipped" in r:
            return "skipped"
        if "error" in r:
            return "error"
        return fmt.format(r[key])

    print(f"\nSimCLR loss fwd+bwd, D={DIM}, T={args.temperature}, fp32 CPU, {args.threads} threads, "
          f"median of {args.reps} runs; memory = peak RSS above baseline during the first run\n")
    head = "| 2N | " + " | ".join(f"{i} MB | {i} s" for i in impls) + " | mem ref/stream | time ref/stream |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for rows in args.sizes:
        row = [str(rows)]
        for impl in impls:
            r = results[impl, rows]
            row += [cell(r, "extra_mb", "{:.1f}"), cell(r, "median_s", "{:.3f}")]
        ref, st = results["reference", rows], results["streaming", rows]
        if all("extra_mb" in r for r in (ref, st)):
            row += [f"{ref['extra_mb'] / max(st['extra_mb'], 1e-3):.1f}x", f"{ref['median_s'] / st['median_s']:.2f}x"]
        else:
            row += ["-", "-"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
