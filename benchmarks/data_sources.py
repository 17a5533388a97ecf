"""Data sources per CPU core: an ImageFolder vs WebDataset shards (issue 19).

On JPEGs of ~500 x 375 (quality 90) made at run time from scikit-learn's sample photos
(``data_pipeline.make_jpegs``), in one process with one intra-op thread, interleaved round by round, it times the
host stage of the two-stage path (SimCLR recipe: two views, RandomResizedCrop 224 + flip, uint8 views plus
parameter rows, batches of 8 collated; file read and JPEG decode included) reading

(a) the ImageFolder (``disk_folder``), in the sampler's global order;
(b) shards written from it (``python -m scaleclr.data.shards write``, 1 MB shards here), global order;
(c) shards written with ``--max-side 320`` (every image re-encoded at 320 px on its longer side), global order;
(d) the shards of (b) in the shard-block order (``SHUFFLE_MODE: shard_block``, 2 shards per window);
(e) lightly's ``SimCLRTransform(input_size=224)`` on the folder's images (PIL in, two float tensors out), if
    lightly is importable (``pip install --target DIR --no-deps lightly==1.6.0 lightning_utilities`` and
    ``PYTHONPATH=DIR``: its transforms need nothing else);

and reports images/s per core (this process's CPU seconds, ``time.process_time``), files opened per 1,000
samples (``open`` calls for the folder, shard opens for shards), file switches per 1,000 samples (a read in
another file than the one before) and non-sequential reads per 1,000 samples (a read that is not at a higher
offset of the file read just before: a seek on a network file system). Ratios
are medians of per-round ratios. Targets: (b)/(a) >= 1.0 and no open per sample; (c)/(e) >= 8.

Usage::

    python benchmarks/data_sources.py                     # 96 images, 5 rounds (run on a quiet machine)
    python benchmarks/data_sources.py --smoke             # 8 images, 1 round: checks that it runs
    python benchmarks/data_sources.py --out results.json
"""
from __future__ import annotations

import argparse
import builtins
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_pipeline import RECIPES, make_jpegs  # noqa: E402

from scaleclr.data import HostStage, SSLDataset, ShardedSampler, simclr_collator  # noqa: E402
from scaleclr.data.shards import ShardSource, shard_lengths  # noqa: E402
from scaleclr.data.shards.writer import write_shards  # noqa: E402
from scaleclr.data.sources import DiskFolderSource  # noqa: E402

CLOCK = time.process_time
HOST_SPECS = RECIPES["simclr_224"][0]  # the full SimCLR list; HostStage runs its host part (decode, crops, flips)


class _CountOpens:
    """Counts ``open`` calls (the folder source's file opens) while active."""

    def __init__(self):
        self.count, self._orig = 0, builtins.open

    def __enter__(self):
        def counting(*a, **k):
            self.count += 1
            return self._orig(*a, **k)
        builtins.open = counting
        return self

    def __exit__(self, *exc):
        builtins.open = self._orig


def order_of(source, mode: str, seed: int = 0) -> list[int]:
    lengths = shard_lengths(source) if mode == "shard_block" else None
    return ShardedSampler(len(source), 1, 0, seed=seed, batch_size=1, drop_last=False, shuffle_mode=mode,
                          shard_lengths=lengths, block_shards=2).global_indices()


def locality(source, order: list[int]) -> tuple[int, int]:
    """``(shard switches, non-sequential reads)`` over ``order``: reads in another file than the read just
    before, and reads not forward in the same file (a seek on a network file system)."""
    if not isinstance(source, ShardSource):
        return len(order), len(order)  # every sample is its own file
    idx = source.index
    prev_shard, prev_off, switches, jumps = -1, -1, 0, 0
    for i in order:
        s, off = int(idx.shard_of[i]), int(idx.offsets[i])
        switches += s != prev_shard
        jumps += not (s == prev_shard and off > prev_off)
        prev_shard, prev_off = s, off
    return switches, jumps


def time_host_stage(source, order: list[int], batch: int = 8) -> tuple[float, int]:
    """CPU seconds to run the host stage over ``order`` in collated batches, and files opened meanwhile."""
    dataset = SSLDataset(source, HostStage.from_specs(HOST_SPECS), seed=0)
    opened0 = getattr(source, "files_opened", 0)
    with _CountOpens() as opens:
        start = CLOCK()
        for b in range(0, len(order), batch):
            simclr_collator([dataset[i] for i in order[b:b + batch]])
        elapsed = CLOCK() - start
    files = source.files_opened - opened0 if isinstance(source, ShardSource) else opens.count
    return elapsed, files


def time_lightly(source, order: list[int], batch: int = 8) -> float | None:
    try:
        from lightly.transforms import SimCLRTransform
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    transform = SimCLRTransform(input_size=224)
    start = CLOCK()
    for b in range(0, len(order), batch):
        views = [transform(source.load(i)) for i in order[b:b + batch]]
        torch.stack([v[0] for v in views] + [v[1] for v in views])
    return CLOCK() - start


def run(images: int, rounds: int, work: str, log: Callable[[str], Any] = print) -> dict:
    torch.set_num_threads(1)
    folder = make_jpegs(os.path.join(work, "folder"), count=images)
    write_shards(folder, os.path.join(work, "shards"), shard_size=1_000_000, progress=False)
    write_shards(folder, os.path.join(work, "shards320"), shard_size=1_000_000, max_side=320, progress=False)
    sources = {"folder": DiskFolderSource(folder), "shards": ShardSource(os.path.join(work, "shards")),
               "shards_320": ShardSource(os.path.join(work, "shards320"))}
    cases = {"a_folder": ("folder", "global"), "b_shards": ("shards", "global"),
             "c_shards_max_side_320": ("shards_320", "global"), "d_shards_shard_block": ("shards", "shard_block")}
    per_round: dict[str, list[float]] = {k: [] for k in [*cases, "e_lightly"]}
    opens: dict[str, float] = {}
    seqs: dict[str, float] = {}
    shard_switches: dict[str, float] = {}
    for r in range(rounds + 1):  # round 0 warms the page cache and the allocator
        for name, (src, mode) in cases.items():
            order = order_of(sources[src], mode, seed=r)
            sources[src].close() if isinstance(sources[src], ShardSource) else None
            dt, files = time_host_stage(sources[src], order)
            if r:
                per_round[name].append(len(order) / dt)
                opens[name] = 1000 * files / len(order)
                switches, jumps = locality(sources[src], order)
                shard_switches[name], seqs[name] = 1000 * switches / len(order), 1000 * jumps / len(order)
        dt = time_lightly(sources["folder"], order_of(sources["folder"], "global", seed=r))
        if r and dt is not None:
            per_round["e_lightly"].append(len(order) / dt)
    res: dict = {"images": images, "rounds": rounds, "img_per_s_per_core": {}, "files_opened_per_1000": opens,
                 "file_switches_per_1000": shard_switches, "nonsequential_reads_per_1000": seqs, "ratios": {}}
    for k, v in per_round.items():
        if v:
            res["img_per_s_per_core"][k] = statistics.median(v)

    def ratio(a: str, b: str) -> None:
        if per_round[a] and per_round[b]:
            res["ratios"][f"{a}/{b}"] = statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))

    ratio("b_shards", "a_folder")
    ratio("c_shards_max_side_320", "b_shards")
    ratio("d_shards_shard_block", "b_shards")
    ratio("a_folder", "e_lightly")
    ratio("c_shards_max_side_320", "e_lightly")
    if not per_round["e_lightly"]:
        res["lightly"] = "not importable: install it as the module docstring says to get column (e)"
    log(f"{images} JPEGs of ~500 x 375, {rounds} rounds, SimCLR host stage (2 x 224), 1 thread, per core")
    log("| case | img/s per core | files opened / 1000 samples | file switches / 1000 | non-sequential reads / 1000 |")
    log("|---|---:|---:|---:|---:|")
    nan = float("nan")
    for k, v in res["img_per_s_per_core"].items():
        log(f"| {k} | {v:.1f} | {opens.get(k, nan):.1f} | {shard_switches.get(k, nan):.1f} | {seqs.get(k, nan):.1f} |")
    for k, v in res["ratios"].items():
        log(f"{k}: {v:.2f}x")
    if "lightly" in res:
        log(f"lightly: {res['lightly']}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="8 images, 1 round")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.rounds = 8, 1
    with tempfile.TemporaryDirectory() as work:
        res = run(args.images, args.rounds, work)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
