"""One picture of one or more runs, drawn from their ``metrics.jsonl`` alone (the only module importing matplotlib).

Four panels against the training step: the loss (per logged step, with each epoch's mean), the learning rate,
images/s, and the evaluations (kNN top-1 at initialisation, after every ``config.KNN_EVAL.EVERY_N_EPOCHS`` epochs
and at the end; the online linear probe's top-1; linear evaluation's top-1 for a linear-evaluation run). Several
runs are drawn side by side in the same panels, one colour each. A running or stopped run can be plotted too.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from scaleclr.metrics import METRICS_FILE

__all__ = ["read_records", "plot_runs"]

EVAL_KEYS = (("knn_top1_init", "kNN top-1", "o"), ("knn_top1", "kNN top-1", "o"), ("probe_top1", "online probe", "s"),
             ("linear_top1", "linear top-1", "^"))


def read_records(run_dir: str) -> List[Dict]:
    """The records of ``run_dir/metrics.jsonl`` in file order (a partly written last line is skipped).

    Raises:
        FileNotFoundError: naming the file when the run has none.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run's config.CHECKPOINT.DIR?)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _series(records: Sequence[Dict], key: str, without: str = ""):
    """``(steps, values)`` of the records holding ``key`` (and not ``without``), one value per step (the last)."""
    pts = sorted({r["step"]: r[key] for r in records if key in r and "step" in r and without not in r}.items())
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: Sequence[str], out: str) -> str:
    """Draws the runs into ``out`` (PNG, or any format matplotlib infers from the suffix); returns ``out``.

    Raises:
        ImportError: matplotlib is missing (``pip install -e '.[plot]'``; ``make train`` installs it).
        ValueError: no run has a loss or evaluation record.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install -e '.[plot]' (make train installs it)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), constrained_layout=True)
    (ax_loss, ax_lr), (ax_ips, ax_eval) = axes
    drawn = False
    for i, run in enumerate(run_dirs):
        recs = read_records(run)
        colour = f"C{i}"
        name = os.path.basename(os.path.normpath(run)) or run
        for ax, key, label in ((ax_loss, "loss", name), (ax_lr, "lr", name), (ax_ips, "images_per_sec", name)):
            x, y = _series(recs, key)
            if x:
                ax.plot(x, y, color=colour, lw=1, alpha=0.6 if key == "loss" else 1.0, label=label)
                drawn = True
        x, y = _series(recs, "epoch_loss")
        if x:
            ax_loss.plot(x, y, color=colour, lw=2, marker=".", label=f"{name} (epoch mean)")
        seen = set()
        for key, label, marker in EVAL_KEYS:
            x, y = _series(recs, key)
            if key == "knn_top1":  # the closing record repeats the last evaluation: one point per step
                x0, y0 = _series(recs, "knn_top1_init", without="knn_top1")  # not the closing record's copy
                x, y = x0 + x, y0 + y
            elif key == "knn_top1_init":
                continue
            if x:
                ax_eval.plot(x, y, color=colour, marker=marker, ls="-" if key != "probe_top1" else "--",
                             label=f"{name}: {label}" if label not in seen else None)
                seen.add(label)
                drawn = True
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no loss or evaluation records in {', '.join(run_dirs)} ({METRICS_FILE})")
    for ax, title, ylabel in ((ax_loss, "loss", "InfoNCE / cross-entropy"), (ax_lr, "learning rate", "lr"),
                              (ax_ips, "throughput", "images/s"), (ax_eval, "evaluation", "top-1 (%)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    suffix = os.path.splitext(out)[1]
    tmp = out + ".tmp" + suffix
    fig.savefig(tmp, dpi=110, format=suffix[1:] or "png")  # no suffix: a PNG, as matplotlib would write
    plt.close(fig)
    os.replace(tmp, out)  # a reader never sees half a picture
    return out
