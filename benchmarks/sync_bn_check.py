"""The SyncBatchNorm sync path in one process, against the group-statistics reference (float64).

``torch.nn.SyncBatchNorm`` falls back to plain batch norm in a one-rank group (``need_sync = world_size > 1`` in
``torch/nn/modules/batchnorm.py``), and so does scaleclr's ``SyncBatchNorm``: comparing the modules in one
process proves nothing. This module calls the sync autograd functions themselves:

* ``torch``: ``torch.nn.modules._functions.SyncBatchNorm.apply`` with the 1-rank group: ``batch_norm_stats``, the
  all-gather, ``batch_norm_gather_stats_with_counts`` (running statistics included), ``batch_norm_elemt``, and in
  the backward ``batch_norm_backward_reduce``, the all-reduce and ``batch_norm_backward_elemt``. CUDA only (these
  kernels have no CPU or meta implementation).
* ``emulated``: the same CUDA kernels on a batch split into unequal parts, one per emulated rank, merged with
  their counts as the all-gather and all-reduce of that many ranks would merge them: the weighting of unequal
  counts, which one rank cannot show.
* ``scaleclr``: ``_group_batch_stats`` + ``_SyncBatchNormFunction`` with the 1-rank group (any device; the CPU
  smoke run of ``benchmarks/gpu_check.py`` uses it).

The reference is ``F.batch_norm`` in float64 on the whole (concatenated) batch, with fp32 weights, bias and
running statistics (scaleclr's BatchNorm policy), for the same upstream gradient ``dy``. Shapes: ``x`` and ``dy``
``[N, C, H, W]``; ``weight``, ``bias`` and the running statistics ``[C]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from numerics import sum_rel_err, unit_roundoff  # noqa: E402

EPS, MOMENTUM = 1e-5, 0.1
KEYS = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")


def make_case(n: int, c: int, hw: int, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Input ``x`` and upstream gradient ``dy`` in ``dtype``, fp32 ``weight``/``bias`` (policy: fp32 BN
    parameters), on ``device``; the input has a non-zero mean and scale per channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g) * (1 + torch.rand(c, 1, 1, generator=g)) + torch.randn(c, 1, 1,
                                                                                                      generator=g)
    return {"x": x.to(device, dtype), "dy": torch.randn(n, c, hw, hw, generator=g).to(device, dtype),
            "weight": (1 + 0.1 * torch.randn(c, generator=g)).to(device),
            "bias": (0.1 * torch.randn(c, generator=g)).to(device)}


def reference64(case: dict) -> dict:
    """Plain batch norm of the whole batch in float64: outputs, gradients, running statistics (from 0 and 1)."""
    x = case["x"].double().requires_grad_()
    w, b = (case[k].double().requires_grad_() for k in ("weight", "bias"))
    c = x.shape[1]
    rm, rv = torch.zeros(c, dtype=torch.float64, device=x.device), torch.ones(c, dtype=torch.float64, device=x.device)
    y = F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)
    y.backward(case["dy"].double())
    return {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad, "running_mean": rm, "running_var": rv}


def _leaves(case):
    return [case[k].clone().requires_grad_() for k in ("x", "weight", "bias")]


def _fresh_stats(case):
    c = case["x"].shape[1]
    return torch.zeros(c, device=case["x"].device), torch.ones(c, device=case["x"].device)


def run_torch(case: dict, group) -> dict:
    """torch's SyncBatchNorm autograd function (CUDA) with ``group``; ``grad_fn`` names the function that ran."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncFunction

    x, w, b = _leaves(case)
    rm, rv = _fresh_stats(case)
    y = SyncFunction.apply(x, w, b, rm, rv, EPS, MOMENTUM, group, dist.get_world_size(group))
    y.backward(case["dy"])
    return {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad, "running_mean": rm,
            "running_var": rv, "grad_fn": type(y.grad_fn).__name__}


def run_emulated(case: dict, splits) -> dict:
    """torch's sync kernels (CUDA) on ``len(splits)`` emulated ranks holding ``splits`` samples each: per-rank
    statistics merged with their counts, per-rank backward sums added (what the all-reduce adds)."""
    x, dy, w, b = case["x"], case["dy"], case["weight"], case["bias"]
    rm, rv = _fresh_stats(case)
    parts, dys = x.split(list(splits)), dy.split(list(splits))
    stats = [torch.batch_norm_stats(p, EPS) for p in parts]
    counts = torch.tensor([p.numel() // p.shape[1] for p in parts], dtype=torch.float32, device=x.device)
    mean, invstd = torch.batch_norm_gather_stats_with_counts(
        x, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]), rm, rv, MOMENTUM, EPS, counts)
    y = torch.cat([torch.batch_norm_elemt(p, w, b, mean, invstd, EPS) for p in parts])
    red = [torch.batch_norm_backward_reduce(d, p, mean, invstd, w, True, True, True) for d, p in zip(dys, parts)]
    sum_dy, sum_dy_xmu = sum(r[0] for r in red), sum(r[1] for r in red)
    dx = torch.cat([torch.batch_norm_backward_elemt(d, p, mean, invstd, w, sum_dy, sum_dy_xmu,
                                                    counts.to(torch.int32)) for d, p in zip(dys, parts)])
    return {"y": y, "dx": dx, "dweight": sum(r[2] for r in red), "dbias": sum(r[3] for r in red),
            "running_mean": rm, "running_var": rv, "grad_fn": "emulated"}


def run_scaleclr(case: dict, group, stats_rows=None) -> dict:
    """scaleclr's sync function with ``group`` (any device). ``stats_rows``: take the statistics from the first
    ``stats_rows`` samples only (a broken merge, for negative controls)."""
    from scaleclr.distributed.sync_bn import _group_batch_stats, _SyncBatchNormFunction

    x, w, b = _leaves(case)
    src = x.detach() if stats_rows is None else x.detach()[:stats_rows]
    mean, m2, count = _group_batch_stats(src, group, dist.get_world_size(group))
    y = _SyncBatchNormFunction.apply(x, w, b, mean, m2 / count, EPS, count, group)
    y.backward(case["dy"])
    return {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad,
            "running_mean": MOMENTUM * mean, "running_var": 1 - MOMENTUM + MOMENTUM * m2 / (count - 1),
            "grad_fn": type(y.grad_fn).__name__}


def limit(key: str, dtype: torch.dtype, n: int) -> float:
    """Limit of ``max|got - ref| / max|ref|`` for ``key``, with ``n`` elements per channel.

    Every statistic is an ``n``-term fp32 sum (relative error ``sum_rel_err(n)``): the mean and the variance each
    carry one, and both enter the normalised values (the variance through ``rsqrt``, halved); ``y`` and ``dx`` are
    then rounded once to the input ``dtype`` (``unit_roundoff``); the backward's two sums (``sum dy``, ``sum dy
    xhat``) add two more. Parameter gradients and running statistics stay fp32 (no output rounding). 2x margin.
    """
    stats = sum_rel_err(n, torch.float32)
    out = unit_roundoff(dtype) if key in ("y", "dx") else unit_roundoff(torch.float32)
    terms = {"y": 2, "dx": 4, "dweight": 3, "dbias": 1, "running_mean": 1, "running_var": 2}[key]
    return 2 * (out + terms * stats)


def compare(got: dict, ref: dict, dtype: torch.dtype) -> dict:
    """``{key: {"err": relative max error, "limit": ..., "ok": ...}}`` plus ``"sync_path"``: whether the output
    came from a sync function (not the plain-BN fallback) and ``"ok"``: all of it."""
    n = ref["y"].numel() // ref["y"].shape[1]
    out = {}
    for k in KEYS:
        if got.get(k) is None:
            continue
        r = ref[k]
        err = float((got[k].double() - r).abs().max() / r.abs().max().clamp_min(1e-300))
        out[k] = {"err": err, "limit": limit(k, dtype, n), "ok": err <= limit(k, dtype, n)}
    fn = got.get("grad_fn", "")
    out["grad_fn"] = fn
    out["sync_path"] = "SyncBatchNorm" in fn or fn == "emulated"
    out["ok"] = out["sync_path"] and all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out
