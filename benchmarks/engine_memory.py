"""Per-rank peak memory of the training engines: DDP vs DeepSpeed ZeRO-1/2/3 (vs FSDP2), CPU, gloo.

Each engine runs in a fresh group of ``--procs`` processes (spawned, 1 thread each): every rank builds the SimCLR
model from the config (default ResNet-50 w2 + its [4096, 4096, 128] head, as
``configs/config/pretrain/simclr/models/resnet50_w2.yaml``), SyncBN-converts it, hands it to the engine exactly
as the trainer does, then runs ``--steps`` training steps (forward, InfoNCE over the gathered batch, backward,
SGD + LARC step) on random images. Memory is read from the kernel inside each rank:

* ``setup``: peak RSS (``VmHWM``) up to the end of ``engine.setup`` (every rank builds the full model before the
  engine shards it, so this is at least one full fp32 model everywhere);
* ``train``: peak RSS during the training steps, after ``/proc/self/clear_refs`` = 5 reset the peak counter at the
  end of setup. This is what the engine holds while training: model states + activations + buffers.
* ``base``: RSS after imports and process-group init, before the model exists; ``train - base`` is the engine's
  footprint.

glibc is told to serve allocations >= 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to
the OS and RSS tracks live memory. The table also gives each engine's model-state bytes per rank by arithmetic
(fp32 training, SGD with momentum; Psi = number of parameters, N = processes)::

    DDP       params 4Psi + grads 4Psi + momentum 4Psi + DDP's gradient buckets 4Psi          = 16 Psi
    ZeRO-1    params 4Psi + grads 4Psi + fp32 master partition 4Psi/N + momentum 4Psi/N      = 8 Psi + 8 Psi/N
    ZeRO-2    params 4Psi + grads 4Psi/N + master 4Psi/N + momentum 4Psi/N                   = 4 Psi + 12 Psi/N
    ZeRO-3    param partition 4Psi/N + master 4Psi/N + grads 4Psi/N + momentum 4Psi/N       = 16 Psi / N
    FSDP2     sharded params 4Psi/N + grads 4Psi/N + momentum 4Psi/N                          = 12 Psi / N

DeepSpeed 0.19.8 keeps its fp32 master partition as a copy of the (here also fp32) module parameters at every
stage (ZeRO-1/2: ``single_partition_of_fp32_groups``; ZeRO-3: ``fp32_partitioned_groups_flat`` next to the
``ds_tensor`` partitions), hence the ``master`` terms.
(plus communication buckets: ``reduce_bucket_size`` / ``allgather_bucket_size`` in ds_configs, and the gathered
working set of one ZeRO-3 / FSDP unit at a time).

Usage::

    python benchmarks/engine_memory.py                       # R50-w2, 2 processes, markdown table on stdout
    python benchmarks/engine_memory.py --engines ddp zero3 --depth 18 --width 1 --image-size 32
    python benchmarks/engine_memory.py --engines ddp ddp_ac zero3 zero3_ac      # + activation checkpointing
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import reset_peak, status_kb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": ["config.DISTRIBUTED.ENGINE=ddp"],
    "zero1": ["config.DISTRIBUTED.ENGINE=deepspeed", "config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero1.json"],
    "zero2": ["config.DISTRIBUTED.ENGINE=deepspeed", "config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero2.json"],
    "zero3": ["config.DISTRIBUTED.ENGINE=deepspeed", "config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero3.json"],
    "fsdp": ["config.DISTRIBUTED.ENGINE=fsdp"],
}
AC = ["config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING=True"]
ENGINES.update({f"{name}_ac": flags + AC for name, flags in list(ENGINES.items())})  # + activation checkpointing
MIB = 2 ** 20




def model_state_bytes(engine: str, n_params: int, world: int) -> int:
    """Model-state bytes per rank by arithmetic (fp32, SGD momentum); see the module docstring."""
    p = 4 * n_params
    return {"ddp": 4 * p, "zero1": 2 * p + 2 * p // world, "zero2": p + 3 * p // world,
            "zero3": 4 * p // world, "fsdp": 3 * p // world}[engine.removesuffix("_ac")]


def overrides(args, engine: str, out_dir: str):
    return ["config=test/integration_test/quick_simclr_synthetic",
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={args.procs}",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={args.batch}",
            f"config.MODEL.TRUNK.RESNETS.DEPTH={args.depth}",
            f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={args.width}",
            "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
            f"config.CHECKPOINT.DIR={out_dir}", *ENGINES[engine]]


def rank_main(rank: int, args, engine: str, port: int, out_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.procs), CUDA_VISIBLE_DEVICES="")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.procs)
    try:
        from scaleclr import builders
        from scaleclr.config import load_config
        from scaleclr.distributed.sync_bn import convert_sync_batchnorm, create_sync_bn_process_group
        from scaleclr.engines import build_engine
        if engine.startswith("zero"):
            import deepspeed  # noqa: F401  (imported before the baseline, like the other imports)
        root, _ = load_config(overrides(args, engine, out_dir), world_size=args.procs)
        c = root.config
        import gc
        gc.collect()
        base = status_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        model = builders.build_model(c)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        group = create_sync_bn_process_group(c.MODEL.SYNC_BN_CONFIG.GROUP_SIZE, num_proc_per_node=args.procs)
        model = convert_sync_batchnorm(model, c.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE, process_group=group,
                                       device=torch.device("cpu"))
        eng = build_engine(builders.build_engine_spec(c, args.procs), torch.device("cpu"), rank, args.procs)
        eng.setup(model, builders.make_optimizer_factory(c))
        del model
        gc.collect()
        setup_peak = status_kb("VmHWM") * 1024
        after_setup = status_kb("VmRSS") * 1024
        loss_fn = builders.build_loss(c)
        lr_at = builders.build_lr_schedule(c)
        gen = torch.Generator().manual_seed(rank)
        views = torch.randn(2 * args.batch, 3, args.image_size, args.image_size, generator=gen)
        reset_peak()
        losses = []
        for it in range(args.steps):
            eng.set_lr(lr_at(it / 100))
            with eng.autocast():
                emb = eng.model(views)
            loss = loss_fn(emb.float())
            eng.backward(loss)
            eng.step()
            eng.zero_grad()
            losses.append(float(loss))
        train_peak = status_kb("VmHWM") * 1024
        queue.put({"rank": rank, "engine": engine, "n_params": n_params, "base": base, "setup_peak": setup_peak,
                   "after_setup": after_setup, "train_peak": train_peak, "losses": losses,
                   "seconds": time.perf_counter() - t0})
    finally:
        dist.destroy_process_group()


def run_engine(args, engine: str):
    import torch.multiprocessing as mp
    from scaleclr.launch import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(rank_main, args=(args, engine, free_port(), out_dir, queue), nprocs=args.procs,
                           start_method="spawn")
        rows = [queue.get() for _ in range(args.procs)]
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", nargs="+", default=[e for e in ENGINES if not e.endswith("_ac")],
                   choices=list(ENGINES))
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="images per process (2 views each)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks: freed tensors leave RSS
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)

    results = {}
    for engine in args.engines:
        try:
            results[engine] = run_engine(args, engine)
        except Exception as e:  # an engine that does not run here is reported, not fatal
            results[engine] = e
        print(f"# {engine}: done", file=sys.stderr, flush=True)

    ok = {k: v for k, v in results.items() if not isinstance(v, Exception)}
    ddp_peak = max(r["train_peak"] for r in ok["ddp"]) if "ddp" in ok else None
    ddp_foot = max(r["train_peak"] - r["base"] for r in ok["ddp"]) if "ddp" in ok else None
    any_rows = next(iter(ok.values()))
    n_params = any_rows[0]["n_params"]
    print(f"ResNet-{args.depth} w{args.width} SimCLR (trunk + head), {n_params / 1e6:.1f} M parameters, "
          f"{args.procs} processes, CPU/gloo, fp32, SGD + LARC, {args.batch} images x 2 views of "
          f"{args.image_size} px per process, {args.steps} steps. Peak RSS per rank (max over ranks), MiB.\n")
    print("| engine | train peak RSS | ratio to DDP | train peak - base | ratio to DDP | setup peak RSS "
          "| model states by arithmetic | first loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for engine in args.engines:
        rows = results[engine]
        if isinstance(rows, Exception):
            print(f"| {engine} | n/a ({type(rows).__name__}: {str(rows).splitlines()[0][:80]}) | | | | | | |")
            continue
        peak = max(r["train_peak"] for r in rows)
        foot = max(r["train_peak"] - r["base"] for r in rows)
        setup = max(r["setup_peak"] for r in rows)
        arith = model_state_bytes(engine, n_params, args.procs)
        ratio = f"{peak / ddp_peak:.2f}" if ddp_peak else "-"
        fratio = f"{foot / ddp_foot:.2f}" if ddp_foot else "-"
        print(f"| {engine} | {peak / MIB:,.0f} | {ratio} | {foot / MIB:,.0f} | {fratio} | {setup / MIB:,.0f} "
              f"| {arith / MIB:,.0f} | {rows[0]['losses'][0]:.4f} |")
    print(f"\nbase (imports + process group, before the model) per rank: "
          + ", ".join(f"{e} {max(r['base'] for r in v) / MIB:,.0f}" for e, v in ok.items()) + " MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
