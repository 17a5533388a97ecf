"""Planner accuracy on CPU: ``scaleclr.plan``'s predicted peak vs the measured peak RSS of a real training step.

Each case (model, image size, two-view or multicrop, fp32 or bf16, engine, activation checkpointing, batch) runs
in a fresh group of ``--procs`` spawned processes (1 thread each, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
tensors leave RSS). Each rank builds the model from the config, SyncBN-converts it, hands it to the engine as
the trainer does, runs one warm-up step (the optimizer's momentum exists from then on, as in steady training),
resets the kernel's peak counter (``/proc/self/clear_refs``) and runs two more steps. Measured:

* ``absolute`` = peak RSS during the steps - RSS after imports and process-group init (before the model) -
  the growth of ``RssFile`` over the same span: the first step touches ~30 MiB of library code (libtorch's and
  oneDNN's kernels, file-backed pages, constant from the warm-up step on) that is process overhead, not memory
  a GPU allocator would hold; anonymous memory is what the planner predicts;
* ``per image`` = (peak at batch B2 - peak at batch B1) / (B2 - B1): the interpreter's and libraries' fixed
  cost cancels. Both batches must be past the point where activations make the peak (an engine's fixed phase,
  e.g. ZeRO-3's at 40 images of R18, flattens the slope between them): ``--batches`` per model in RESULTS.md;
* ``tensors' peak``: the largest total of live tensor storages during the same steps (``procmem.tensor_peak``,
  a dispatch mode: the CPU counterpart of ``torch.cuda.max_memory_allocated``, without the Python objects and
  allocator slack RSS also holds), above those before the model.

The prediction is ``scaleclr.plan.predict(..., device_type="cpu")`` for the same config (max over ranks of the
measurement). Usage::

    python benchmarks/plan_accuracy.py --smoke                # one R18 case at 32 px, 1 process (seconds)
    python benchmarks/plan_accuracy.py --models r18 --engines ddp fsdp    # a product of fewer values
    python benchmarks/plan_accuracy.py --cases r18:64:two:fp32:ddp:off r50w2:96:multicrop:bf16:zero3:on
    python benchmarks/plan_accuracy.py                       # the full table (hours on 2 cores, < 6 GiB)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import reset_peak, status_kb, tensor_peak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"r18": (18, 1), "r50": (50, 1), "r50w2": (50, 2)}
ENGINE_FLAGS = {
    "ddp": ["config.DISTRIBUTED.ENGINE=ddp"],
    "fsdp": ["config.DISTRIBUTED.ENGINE=fsdp"],
    **{f"zero{k}": ["config.DISTRIBUTED.ENGINE=deepspeed",
                    f"config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero{k}.json"] for k in (1, 2, 3)},
}
MIB = 2 ** 20


def case_overrides(case: dict, out_dir: str) -> list:
    depth, width = MODELS[case["model"]]
    o = ["config=test/integration_test/quick_simclr_synthetic",
         f"config.DISTRIBUTED.NUM_PROC_PER_NODE={case['procs']}",
         f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={case['batch']}", f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}",
         f"config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER={width}",
         "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", f"config.CHECKPOINT.DIR={out_dir}",
         "config.MODEL.CHANNELS_LAST=off",
         f"config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING={case['ac']}",
         *ENGINE_FLAGS[case["engine"]]]
    s = case["size"]
    if case["views"] == "multicrop":
        small = max(16, s * 3 // 5)
        o += ["+config/pretrain/simclr/transforms=multicrop_2x160_4x96",
              f"config.DATA.TRAIN.TRANSFORMS.0.size_crops=[{s},{small}]"]
    else:
        o += [f"config.DATA.TRAIN.TRANSFORMS.1.size={s}"]
    if case["dtype"] == "bf16":
        o += ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
              "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"]
    return o


def case_step(case: dict, rank: int, c):
    """Build ``case``'s model, SyncBN conversion, engine and loss (config node ``c``: :func:`case_overrides`) as
    the trainer does on this (initialised) rank; return ``step()``, one training step on a fresh random batch."""
    import torch

    from scaleclr import builders
    from scaleclr.distributed.sync_bn import convert_sync_batchnorm, create_sync_bn_process_group
    from scaleclr.engines import build_engine
    from scaleclr.plan import crop_views

    model = builders.build_model(c)
    if case["procs"] > 1:
        group = create_sync_bn_process_group(0, num_proc_per_node=case["procs"])
        model = convert_sync_batchnorm(model, "pytorch", process_group=group, device=torch.device("cpu"))
    spec = builders.build_engine_spec(c, case["procs"], torch.device("cpu"))
    eng = build_engine(spec, torch.device("cpu"), rank, case["procs"])
    eng.setup(model, builders.make_optimizer_factory(c))
    del model
    loss_fn = builders.build_loss(c)
    gen = torch.Generator().manual_seed(rank)
    views, as_list = crop_views(c)
    B = case["batch"]

    def batch():
        if as_list:
            return [torch.randn(B, 3, s, s, generator=gen) for n, s in views for _ in range(n)]
        (n, s), = views
        return torch.randn(n * B, 3, s, s, generator=gen)

    def step():
        x = batch()
        with eng.autocast():
            emb = eng.model(x)
        loss = loss_fn(emb.float())
        eng.backward(loss)
        eng.step()
        eng.zero_grad()

    return step


def rank_main(rank: int, case: dict, port: int, out_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(case["procs"]), CUDA_VISIBLE_DEVICES="")
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=case["procs"])
    try:
        from scaleclr.config import load_config
        if case["engine"].startswith("zero"):
            import deepspeed  # noqa: F401  (before the baseline, like the other imports)
        root, _ = load_config(case_overrides(case, out_dir), world_size=case["procs"])
        gc.collect()
        base, base_file = status_kb("VmRSS") * 1024, status_kb("RssFile") * 1024
        with tensor_peak() as before:
            pass
        step = case_step(case, rank, root.config)
        step()
        gc.collect()
        reset_peak()
        file_before = status_kb("RssFile") * 1024
        with tensor_peak() as tensors:
            for _ in range(2):
                step()
        peak, file_after = status_kb("VmHWM") * 1024, status_kb("RssFile") * 1024
        # code pages: counted at their largest (RssFile after the steps >= at the reset), so none hides as anon
        queue.put({"rank": rank, "base": base, "peak": peak, "code": max(file_before, file_after) - base_file,
                   "tensors": tensors.peak - before.peak})
    finally:
        dist.destroy_process_group()


def measure(case: dict) -> tuple:
    """``(peak RSS above the base less the library code pages touched since, peak of live tensor bytes above
    those before the model)``, each the max over ranks, in a fresh group of processes."""
    import torch.multiprocessing as mp
    from scaleclr.launch import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(rank_main, args=(case, free_port(), out_dir, queue), nprocs=case["procs"],
                           start_method="spawn")
        rows = [queue.get() for _ in range(case["procs"])]
    return max(r["peak"] - r["base"] - r["code"] for r in rows), max(r["tensors"] for r in rows)


def predict(case: dict) -> int:
    from scaleclr.config import load_config
    from scaleclr.plan import predict as plan_predict

    with tempfile.TemporaryDirectory() as out_dir:
        root, _ = load_config(case_overrides(case, out_dir), world_size=case["procs"])
        return plan_predict(root, case["engine"], case["ac"], device_type="cpu")["peak_bytes"]


def compare(measured: list, predicted: list, b1: int, b2: int, tensors=None) -> dict:
    """Errors of the prediction: per image (RSS growth), absolute at ``b2`` against RSS and (``tensors``: the
    live tensor peaks at ``b1``, ``b2``) against the tensors' peak."""
    (m1, m2), (p1, p2) = measured, predicted
    out = {"measured": [m1, m2], "predicted": [p1, p2], "per_image_measured": (m2 - m1) / (b2 - b1),
           "per_image_predicted": (p2 - p1) / (b2 - b1), "per_image_error": (p2 - p1) / (m2 - m1) - 1,
           "absolute_error": p2 / m2 - 1}
    if tensors:
        out.update(tensors_measured=list(tensors), tensors_error=p2 / tensors[1] - 1)
    return out


def run(case: dict, b1: int, b2: int) -> dict:
    (r1, t1), (r2, t2) = measure({**case, "batch": b1}), measure({**case, "batch": b2})
    predicted = [predict({**case, "batch": b1}), predict({**case, "batch": b2})]
    return {**case, "b1": b1, "b2": b2, **compare([r1, r2], predicted, b1, b2, [t1, t2])}


def repredict(row: dict) -> dict:
    """``row`` (a measured case) with this checkout's predictions."""
    case = {k: row[k] for k in ("model", "size", "views", "dtype", "engine", "ac", "procs")}
    return {**row, **compare(row["measured"], [predict({**case, "batch": b}) for b in (row["b1"], row["b2"])],
                             row["b1"], row["b2"], row.get("tensors_measured"))}


def print_table(rows: list, header: bool) -> None:
    """The header (``header``) and a Markdown row per case."""
    if header:
        print("| model | px | views | dtype | engine | ckpt | procs | B1, B2 | per image meas. (MiB) | pred. | error "
              "| peak at B2 meas. (MiB) | pred. | error | tensors' peak (MiB) | error |")
        print("|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tensors = (f"{r['tensors_measured'][1] / MIB:,.0f} | {100 * r['tensors_error']:+.1f} %"
                   if "tensors_measured" in r else "not measured | ")
        print(f"| {r['model']} | {r['size']} | {r['views']} | {r['dtype']} | {r['engine']} | "
              f"{'on' if r['ac'] else 'off'} | {r['procs']} | {r['b1']}, {r['b2']} | "
              f"{r['per_image_measured'] / MIB:.2f} | {r['per_image_predicted'] / MIB:.2f} | "
              f"{100 * r['per_image_error']:+.1f} % | {r['measured'][1] / MIB:,.0f} | {r['predicted'][1] / MIB:,.0f} | "
              f"{100 * r['absolute_error']:+.1f} % | {tensors} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="one R18 case at 32 px, 1 process")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 96])
    p.add_argument("--views", nargs="+", default=["two", "multicrop"], choices=["two", "multicrop"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--engines", nargs="+", default=list(ENGINE_FLAGS), choices=list(ENGINE_FLAGS))
    p.add_argument("--ac", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=None, metavar="MODEL:PX:VIEWS:DTYPE:ENGINE:CKPT",
                   help="these cases instead of the product, e.g. r50:64:multicrop:bf16:zero3:on")
    p.add_argument("--batches", nargs=2, type=int, default=[4, 16], help="B1 B2 images per process")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--repredict", nargs="+", default=None, metavar="JSON",
                   help="no measurement: the rows of earlier --json files, predicted again by this checkout's planner")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks: freed tensors leave RSS
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    if args.repredict:
        rows = [repredict(r) for f in args.repredict for r in json.loads(Path(f).read_text())]
        print_table(rows, True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.smoke:
        cases = [dict(model="r18", size=args.sizes[0] if args.sizes != [64, 96] else 64, views="two", dtype="fp32",
                      engine="ddp", ac=False, procs=1)]
        b1, b2 = 4, 24
    elif args.cases:
        cases = [dict(zip(("model", "size", "views", "dtype", "engine", "ac"), spec.split(":")), procs=args.procs)
                 for spec in args.cases]
        for c in cases:
            c.update(size=int(c["size"]), ac=c["ac"] == "on")
        b1, b2 = args.batches
    else:
        cases = [dict(model=m, size=s, views=v, dtype=d, engine=e, ac=a == "on", procs=args.procs)
                 for m, s, v, d, e, a in itertools.product(args.models, args.sizes, args.views, args.dtypes,
                                                           args.engines, args.ac)]
        b1, b2 = args.batches
    rows = []
    print_table(rows, True)
    for case in cases:
        rows.append(run(case, b1, b2))
        print_table(rows[-1:], False)
        if args.json:  # after every case: a long table keeps what finished
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
