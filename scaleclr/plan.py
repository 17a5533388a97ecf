"""Memory planner: which engine, batch, precision and checkpointing fit a GPU, before the allocation is spent.

    python -m scaleclr.plan config=pretrain/simclr/simclr_8node_resnet [config.X.Y=v ...] \\
        [--device cuda|cpu] [--gpu-memory 80GiB] [--json]

Takes the same config and overrides as ``train.py`` and prints, for the config's trunk, head, crops, precision,
loss implementation, world size and batch per GPU, one row per engine (ddp, fsdp, zero1, zero2, zero3) x
activation checkpointing (off, on): predicted peak bytes per GPU split into parameters, gradients, optimizer
state, communication buffers, activations saved for backward, the loss's buffers and the transient rest;
whether it fits ``--gpu-memory`` (default: the visible GPU's total memory); and the largest batch per GPU that
fits. Nothing is allocated: the step is traced on fake tensors (:mod:`scaleclr.planner.trace`) and each engine
states its own layout (``Engine.memory_layout``). ``--json`` prints ``{"rows": [{"engine",
"activation_checkpointing", "batch_per_gpu", "peak_bytes", "fits", "max_batch_per_gpu", ...}]}``.

``train.py`` on CUDA runs :func:`memory_check` for its own configuration before building the model
(``config.MODEL.MEMORY_CHECK``: ``warn`` logs a predicted out-of-memory with a configuration that fits, ``error``
stops with exit status 2, ``off`` skips it). Exit statuses of this command: 0, 2 on a configuration error.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any, Dict, List, Optional

import torch

from scaleclr.config import ConfigError, load_config
from scaleclr.planner.rows import ROWS, MemoryCheckError, Planner, crop_views, memory_check, plan, predict

logger = logging.getLogger("scaleclr.plan")

__all__ = ["ROWS", "Planner", "plan", "predict", "memory_check", "MemoryCheckError", "crop_views", "parse_bytes",
           "format_table", "main"]

UNITS = {"": 1, "b": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
         "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"80 GB"``, ``"81920MiB"``, ``"1e9"`` -> bytes. Raises ValueError naming the value."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 80GiB, 80GB or 81920MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def format_table(result: Dict[str, Any]) -> str:
    gib = lambda v: "-" if v is None else f"{v / 2 ** 30:.2f}"  # noqa: E731
    mem = result["gpu_memory_bytes"]
    head = (f"{result['parameters'] / 1e6:.1f} M parameters, world {result['world_size']}, views "
            f"{' + '.join(f'{n}x{s}px' for n, s in result['views'])}, device {result['device']}, GPU memory "
            f"{gib(mem)} GiB; bytes per GPU in GiB\n")
    cols = ["engine", "ckpt", "batch", "params", "grads", "optim", "buffers", "activ", "loss", "transient", "peak",
            "fits", "max batch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([r["engine"], "on" if r["activation_checkpointing"] else "off",
                                        str(r["batch_per_gpu"])] + [gib(r[f"{k}_bytes"]) for k in
                                        ("params", "grads", "optimizer", "buffers", "activations", "loss",
                                         "transient")] + [gib(r["peak_bytes"]),
                                        "-" if r["fits"] is None else ("yes" if r["fits"] else "NO"),
                                        "-" if r["max_batch_per_gpu"] is None else str(r["max_batch_per_gpu"])])
                     + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    from scaleclr.launch import setup_logging
    from scaleclr.main import parse_args

    p = argparse.ArgumentParser(prog="python -m scaleclr.plan", description=__doc__.split("\n")[0],
                                epilog="the other arguments are train.py's (Hydra overrides, --deepspeed_config)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="plan for this device type")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB (default: the visible GPU's)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args, rest = p.parse_known_args(argv)
    setup_logging(0)
    try:
        _, overrides = parse_args(rest)
        root, _ = load_config(overrides)
        if args.gpu_memory is not None:
            total = parse_bytes(args.gpu_memory)
        elif args.device == "cuda" and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
        else:
            raise ConfigError("--gpu-memory", "is required on a machine without a visible GPU (e.g. 80GiB)")
        result = plan(root, args.device, total)
    except (ConfigError, ValueError) as e:
        logger.error("configuration error: %s", e)
        return 2
    sys.stdout.write(json.dumps(result, indent=1) + "\n" if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
