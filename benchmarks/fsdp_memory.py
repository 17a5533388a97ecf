"""Per-rank peak memory of the DDP and FSDP2 engines, with and without activation checkpointing, in one run.

Default case: SimCLR ResNet-50 x2 (R50-w2: 94M trunk + 17M head parameters; VISSL's resnet50_w2 heads), 2 processes
on CPU/gloo, SyncBN, LARC + momentum SGD, 8 images x 2 views per rank at 160 px, 2 training steps (the second step
holds the momentum buffers). Every case runs the real ``Trainer`` in 2 fresh processes (about 5 minutes on 2 cores,
8 GB of RAM at the peak).

Measurement (per rank): the process's peak resident memory during model build + training, minus its resident
memory just before (imports, process group and data set are excluded). The kernel's peak counter is reset first
(``/proc/self/clear_refs`` = 5, then ``VmHWM``; ``ru_maxrss`` where that is not writable). The children run with
``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor above 64 KiB is its own ``mmap`` and freeing it returns the pages at
once: resident memory then follows live tensor memory instead of glibc's free lists. On a GPU the same question is
answered by ``torch.cuda.max_memory_allocated``; the ratios, not the absolute CPU megabytes, are what carries over.

Usage::

    python benchmarks/fsdp_memory.py                         # markdown table on stdout
    python benchmarks/fsdp_memory.py --batch 4 --size 128 --cases ddp fsdp --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import reset_peak, status_kb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = {  # name: (engine, activation checkpointing)
    "ddp": ("ddp", False),
    "ddp+ac": ("ddp", True),
    "fsdp": ("fsdp", False),
    "fsdp+ac": ("fsdp", True),
}




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(args, engine: str, ac: bool, world: int, out_dir: str):
    return ["config=test/integration_test/quick_simclr_synthetic",
            "+config/pretrain/simclr/models=resnet50_w2" if args.width == 2 and args.depth == 50 else
            f"config.MODEL.TRUNK.RESNETS.DEPTH={args.depth}",
            f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={args.width}",
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}", f"config.DISTRIBUTED.ENGINE={engine}",
            f"config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING={ac}",
            f"config.MODEL.FSDP_CONFIG.MIXED_PRECISION={args.mixed_precision}",
            f"config.MODEL.FSDP_CONFIG.RESHARD_AFTER_FORWARD={not args.no_reshard}",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={args.batch}",
            f"config.DATA.TRAIN.DATA_LIMIT={args.batch * world * args.steps}",
            f"config.DATA.TRAIN.SYNTHETIC_IMAGE_SIZE={args.size}", f"config.DATA.TRAIN.TRANSFORMS.1.size={args.size}",
            f"config.TRAINER.MAX_ITERATIONS={args.steps}", "config.OPTIMIZER.num_epochs=1",
            f"config.CHECKPOINT.DIR={out_dir}", "config.CHECKPOINT.AUTO_RESUME=False",
            "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.LOG_FREQUENCY=1000"] + (
        [] if args.mixed_precision == "none" else  # DDP: autocast in the same dtype
        ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
         f"config.MODEL.AMP_PARAMS.AMP_DTYPE={args.mixed_precision}"])


def _worker(local_rank: int, case: str, args, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(local_rank), CUDA_VISIBLE_DEVICES="")
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=local_rank, world_size=world)
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    engine, ac = CASES[case]
    root, _ = load_config(overrides(args, engine, ac, world, os.path.join(out_dir, case)), world_size=world)
    from scaleclr import builders
    builders.build_train_data(root.config, local_rank, world)  # data-side imports/caches outside the window
    dist.barrier()
    base_kb = status_kb("VmRSS")
    reset_ok = reset_peak()
    tr = Trainer(root, rank=local_rank, world_size=world, local_rank=local_rank, local_world_size=world)
    tr.save_checkpoint = lambda *a, **k: None
    times = []
    step = tr.train_step

    def timed(batch, data_time):
        t = time.perf_counter()
        loss = step(batch, data_time)
        times.append(time.perf_counter() - t)
        return loss

    tr.train_step = timed
    tr.train()
    peak_kb = status_kb("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = tr.engine.module.parameters()
    local_numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    total_numel = sum(p.numel() for p in tr.engine.module.parameters())
    res = {"case": case, "rank": local_rank, "peak_mb": (peak_kb - base_kb) / 1024, "step_s": times,
           "local_params": local_numel, "total_params": total_numel,
           "method": "VmHWM" if reset_ok else "ru_maxrss"}
    with open(os.path.join(out_dir, f"{case}.rank{local_rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def run_case(case: str, args, out_dir: str):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(case, args, args.procs, _free_port(), out_dir), nprocs=args.procs,
                       start_method="spawn")
    return [json.load(open(os.path.join(out_dir, f"{case}.rank{r}.json"))) for r in range(args.procs)]


def table(results, args) -> str:
    ref = max(r["peak_mb"] for r in results["ddp"]) if "ddp" in results else None
    name = f"R{args.depth}-w{args.width}"
    lines = [f"Per-rank peak memory, {name}, {args.procs} processes (CPU/gloo), {args.batch} images x 2 views per rank "
             f"at {args.size} px, SyncBN + LARC, {args.steps} steps, params "
             f"{'fp32' if args.mixed_precision == 'none' else args.mixed_precision}:", "",
             "| engine | activation ckpt | peak per rank (MiB) | ratio to DDP | params held per rank | step time (s)* |",
             "|---|---|---|---|---|---|"]
    for case, rs in results.items():
        engine, ac = CASES[case]
        peak = max(r["peak_mb"] for r in rs)
        ratio = f"{peak / ref:.2f}" if ref else "-"
        held = f"{max(r['local_params'] for r in rs) / 1e6:.1f}M of {rs[0]['total_params'] / 1e6:.1f}M"
        step = sum(sum(r["step_s"][1:] or r["step_s"]) / len(r["step_s"][1:] or r["step_s"]) for r in rs) / len(rs)
        peaks = " / ".join("%.0f" % r["peak_mb"] for r in rs)
        lines.append(f"| {engine} | {'on' if ac else 'off'} | {peaks} | {ratio} | {held} | {step:.1f} |")
    lines += ["", "* mean of the steps after the first; wall clock on shared CPU cores, indicative only."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="images per rank (2 views each)")
    p.add_argument("--size", type=int, default=160, help="crop size in pixels")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--mixed-precision", default="none", choices=("none", "bfloat16", "float16"),
                   help="FSDP_CONFIG.MIXED_PRECISION; the DDP cases then use AMP in the same dtype")
    p.add_argument("--no-reshard", action="store_true", help="FSDP_CONFIG.RESHARD_AFTER_FORWARD=False")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--json", default=None, help="also write the raw per-rank results here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when each child starts
    results = {}
    with tempfile.TemporaryDirectory(prefix="fsdp_memory_") as out_dir:
        for case in args.cases:
            t = time.time()
            results[case] = run_case(case, args, out_dir)
            print(f"{case}: {[round(r['peak_mb']) for r in results[case]]} MiB per rank "
                  f"({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    print(table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
