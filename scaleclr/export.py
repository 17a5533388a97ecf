"""Export a checkpoint of any engine as torchvision, VISSL or scaleclr weights (fp32, no process group, no GPU)::

    python -m scaleclr.export runs/x/model_final_checkpoint_phase99.torch r50.pth --format torchvision
    python -m scaleclr.export runs/x/model_phase9 r50w2_vissl.torch --format vissl      # FSDP / DeepSpeed dir
    python -m scaleclr.export runs/x/model_phase9 r50w2.torch --format scaleclr

CHECKPOINT: a DDP checkpoint file, an FSDP2 (DCP) or DeepSpeed checkpoint directory, a scaleclr export /
``<tag>_consolidated_fp32.torch``, or a VISSL / torchvision file (:func:`scaleclr.interchange.read_checkpoint`).

Formats (:mod:`scaleclr.interchange.formats`):

* ``torchvision``: the flat state dict of ``torchvision.models.<arch>()`` (arch from the weights' shapes:
  resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d/64x4d, wide_resnet50_2/101_2). A linear-evaluation
  classifier (``formats.CLASSIFIER_LAYOUTS``) becomes ``fc`` (an eval-mode BatchNorm in front is folded in), so
  ``load_state_dict(strict=True)`` works; otherwise only ``fc.*`` is missing. Wide trunks (w2, w4) are refused.
* ``vissl``: VISSL's model-zoo layout (``classy_state_dict.base_model.model.{trunk,heads}``), which VISSL's
  ``convert_vissl_to_torchvision.py`` and ``config.MODEL.WEIGHTS_INIT`` read.
* ``scaleclr``: ``{"format": "scaleclr", "model": {trunk.*, heads.*}, "trunk", "heads", "trunk_config"}``.

OUT is never replaced unless ``--overwrite`` is given, and never when it is the input checkpoint (or inside it,
or a link to it), with or without ``--overwrite``; the file is written to a temporary name and moved into place.

Exit status: 0 on success (the written file and what it holds are printed on stdout), 2 on bad input (including
an existing OUT without ``--overwrite``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from scaleclr.io import atomic_torch_save, check_output_path
from scaleclr.interchange import formats
from scaleclr.interchange.checkpoints import read_checkpoint

FORMATS = ("torchvision", "vissl", "scaleclr")


def export(checkpoint: str, out: str, fmt: str, fc: bool = True, bn_eps: float = 1e-5,
           allow_pickle: bool = False, overwrite: bool = False) -> str:
    """Write ``checkpoint``'s weights to ``out`` in format ``fmt``; returns a one-line description of the output.

    Raises:
        ValueError: unreadable or unknown input, or weights the format cannot hold (e.g. a w2 trunk for torchvision).
        scaleclr.io.OutputExistsError: ``out`` exists and not ``overwrite``, or ``out`` is the input.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: allowed formats are {', '.join(FORMATS)}")
    if os.path.isdir(out):
        raise ValueError(f"OUT={out} is a directory; give a file name (e.g. {os.path.join(out, 'weights.torch')})")
    check_output_path(out, [checkpoint], overwrite)
    ck = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    state = ck.state
    n_trunk = sum(k.startswith(formats.TRUNK) for k in state)
    if n_trunk == 0:
        raise ValueError(f"{checkpoint} ({ck.source}) has no trunk.* weights")
    arch = formats.describe_trunk(formats.infer_trunk_config(state))
    if fmt == "torchvision":
        tv, name, clf = formats.to_torchvision(state, classifier=fc, bn_eps=bn_eps)
        atomic_torch_save(tv, out, overwrite=overwrite)
        head = f"fc from the linear-evaluation classifier {clf.describe()}" if clf else \
            "no fc (load with strict=False: only fc.weight, fc.bias missing)"
        dropped = sum(k.startswith(formats.HEADS) for k in state) if clf is None else 0
        return (f"{out}: torchvision.models.{name}() state dict, {len(tv)} tensors, {head}"
                + (f"; {dropped} projection-head tensors dropped" if dropped else "") + f" (from {ck.source})")
    if fmt == "vissl":
        atomic_torch_save(formats.to_vissl(state, phase_idx=ck.phase_idx, iteration=ck.iteration), out,
                          overwrite=overwrite)
        n_heads = len(state) - n_trunk
        return (f"{out}: VISSL model-zoo checkpoint ({arch}), classy_state_dict.base_model.model.trunk "
                f"{n_trunk} tensors (_feature_blocks.*), heads {n_heads} tensors (from {ck.source})")
    atomic_torch_save(formats.scaleclr_payload(state, source=ck.source), out, overwrite=overwrite)
    return f"{out}: scaleclr weights ({arch}), model {len(state)} tensors (from {ck.source})"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scaleclr.export",
        description="Export a scaleclr checkpoint (DDP file, FSDP or DeepSpeed directory, export file) or a "
                    "VISSL / torchvision file as torchvision, VISSL or scaleclr weights, in fp32.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or directory")
    p.add_argument("out", metavar="OUT", help="output file")
    p.add_argument("--format", required=True, choices=FORMATS, help="output layout")
    p.add_argument("--no-fc", dest="fc", action="store_false",
                   help="torchvision: never map heads.0 to fc (e.g. a pretraining run whose projection head is one "
                        "Linear, which looks like a linear-evaluation classifier)")
    p.add_argument("--bn-eps", type=float, default=1e-5,
                   help="eps of the classifier's BatchNorm when it is folded into fc (default 1e-5)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read CHECKPOINT with torch.load(weights_only=False): only for files you trust; the output "
                        "holds tensors only")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (never when OUT is CHECKPOINT itself)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        print(export(args.checkpoint, args.out, args.format, fc=args.fc, bn_eps=args.bn_eps,
                     allow_pickle=args.allow_pickle, overwrite=args.overwrite), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
