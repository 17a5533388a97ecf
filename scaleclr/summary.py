"""The demo's figures side by side, read back from the runs' ``metrics.jsonl`` (the last line of ``make train``), and
a picture of one or more runs::

    python -m scaleclr.summary runs/quickstart --linear runs/quickstart_linear --linear-init runs/quickstart_linear_init
    python -m scaleclr.summary runs/a runs/b --plot curves.png      # runs side by side (matplotlib: the plot extra)

prints the kNN top-1 of the pretraining run (``knn_top1`` after training, ``knn_top1_init`` at initialisation) and
the last test phase of two linear evaluations with the same protocol (``linear_top1`` / ``linear_top5``): one on
the pretrained trunk, one on the trunk at initialisation. Reading the stored records makes it idempotent: a
re-run of ``make train`` whose runs are already finished prints the same figures without training again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from scaleclr.metrics import METRICS_FILE

__all__ = ["last_record", "summarize", "main"]


def last_record(run_dir: str, key: str) -> Optional[Dict]:
    """The last record of ``run_dir/metrics.jsonl`` that has ``key`` (None when there is none)."""
    path = os.path.join(run_dir, METRICS_FILE)
    found = None
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if key in rec:
                    found = rec
    return found


def _pct(rec: Optional[Dict], key: str) -> str:
    return f"{rec[key]:.2f}%" if rec and key in rec else "n/a"


def summarize(pretrain: str, linear: Optional[str] = None, linear_init: Optional[str] = None) -> List[str]:
    """The summary lines (see the module docstring); ``n/a`` for a figure a run did not record."""
    lines = []
    knn = last_record(pretrain, "knn_top1")
    if knn is not None:
        lines.append(f"kNN top-1 on the held-out split:         {_pct(knn, 'knn_top1')} after pretraining, "
                     f"{_pct(knn, 'knn_top1_init')} at initialisation ({pretrain})")
    if linear or linear_init:
        after = last_record(linear, "linear_top1") if linear else None
        init = last_record(linear_init, "linear_top1") if linear_init else None
        n = (after or init or {}).get("test_images", "?")
        lines.append(f"linear top-1 / top-5 on the same split:  {_pct(after, 'linear_top1')} / "
                     f"{_pct(after, 'linear_top5')} after pretraining, {_pct(init, 'linear_top1')} / "
                     f"{_pct(init, 'linear_top5')} at initialisation ({n} images; {linear}, {linear_init})")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scaleclr.summary", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (config.CHECKPOINT.DIR); the first one's kNN "
                   "figures are printed, all of them are drawn with --plot")
    p.add_argument("--linear", help="linear evaluation of the pretrained trunk (its CHECKPOINT.DIR)")
    p.add_argument("--linear-init", help="the same protocol on the trunk at initialisation")
    p.add_argument("--plot", metavar="FILE.png", help="draw loss, learning rate, images/s and the evaluations of "
                   "every RUN into this picture")
    args = p.parse_args(argv)
    if args.plot:
        from scaleclr.plot import plot_runs

        try:
            print(f"learning curves: {plot_runs(args.runs, args.plot)}")
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    lines = summarize(args.runs[0], args.linear, args.linear_init)
    if not lines and not args.plot:
        print(f"no kNN or linear-evaluation records in {args.runs[0]}/{METRICS_FILE}", file=sys.stderr)
        return 2
    if lines:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
