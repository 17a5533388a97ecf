"""Watching the representation while it trains: kNN top-1 on a labelled held-out split at the start, every
``config.KNN_EVAL.EVERY_N_EPOCHS`` epochs and at the end, and the online linear probe (``config.ONLINE_LINEAR_PROBE``)
trained in every step on the detached trunk features (SimCLR, arXiv 2002.05709, Sec. 4 evaluates its representation
with a linear classifier; the probe follows that figure as the run goes).

Every rank extracts its shard of both splits through the engine's model (DDP, FSDP2, DeepSpeed; eval-mode BatchNorm,
the run's autocast): no second model, no rank waiting for another; :func:`scaleclr.eval.knn.knn_top1` is exact over
the shards, so 1 process gives the figures of N. Records go to ``metrics.jsonl`` (and TensorBoard) through the run's
metric logger, before the epoch's checkpoint, so a resumed run neither repeats nor skips one.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import torch

from scaleclr import builders
from scaleclr.distributed.collectives import all_reduce_sum
from scaleclr.eval.knn import extract_shard, knn_top1
from scaleclr.eval.online import OnlineProbe
from scaleclr.summary import last_record

logger = logging.getLogger(__name__)

__all__ = ["Monitor"]


class Monitor:
    """kNN evaluation and the online probe of one training process.

    Args:
        c: the ``config`` node.
        ctx: the task context (:class:`scaleclr.tasks.TaskContext`: rank, world, device, memory format, copies).
        num_features: ``F``, the trunk's output width.
        train_data: the training dataset (with the probe on: its ``source.labels`` give the probe's classes).
    """

    def __init__(self, c, ctx, num_features: int, train_data) -> None:
        self.c, self.ctx = c, ctx
        self.probe = self._build_probe(num_features, train_data)
        self._data = None  # the kNN split's loaders, built at the first evaluation
        self.evaluated_at = -1  # the step of the last evaluation

    def _build_probe(self, num_features: int, train_data) -> Optional[OnlineProbe]:
        p = self.c.ONLINE_LINEAR_PROBE
        if not p.ENABLED:
            return None
        labels = train_data.source.labels
        if len(labels) == 0 or min(labels) < 0:
            raise ValueError("config.ONLINE_LINEAR_PROBE.ENABLED=True needs labelled training images "
                             "(config.DATA.TRAIN: class folders of disk_folder, or LABEL_SOURCES with LABEL_PATHS); "
                             f"{'none' if len(labels) == 0 else 'some'} of config.DATA.TRAIN's images have a label")
        return OnlineProbe(num_features, int(max(labels)) + 1, p.LR, p.MOMENTUM, p.WEIGHT_DECAY, self.c.SEED_VALUE,
                           self.ctx.device)

    # ------------------------------------------------------------------------------------------ the step
    @property
    def forward_kwargs(self) -> Dict[str, Any]:
        """What the model's forward is called with: the trunk features too when the probe trains on them."""
        return {"return_features": True} if self.probe else {}

    def train_step(self, features: torch.Tensor, batch: Dict[str, Any]) -> None:
        """The probe's step on the views' trunk features ``[V·B, F]`` (detached) and their labels."""
        self.probe.train_step(features, batch["label"].to(self.ctx.device, non_blocking=self.ctx.non_blocking))

    # ----------------------------------------------------------------------------------------- evaluations
    def due(self, epochs_done: int) -> bool:
        every = self.c.KNN_EVAL.EVERY_N_EPOCHS
        return bool(self.c.KNN_EVAL.ENABLED and every and epochs_done % every == 0)

    def figures(self, engine) -> Dict[str, float]:
        """``{"knn_top1": %, "probe_top1": %}`` of the model as it is (collective: every rank calls it)."""
        if self._data is None:
            self._data = builders.build_knn_data(self.c, self.ctx.rank, self.ctx.world_size)
        model, fmt = engine.model, self.ctx.memory_format
        was_training = model.training
        model.eval()
        feats = lambda x: model(x.contiguous(memory_format=fmt), features_only=True)  # noqa: E731
        with torch.no_grad(), engine.autocast():
            (tr_f, tr_y, tr_v), (va_f, va_y, va_v) = (
                extract_shard(feats, loader, sampler, self.ctx.device, non_blocking=self.ctx.non_blocking)
                for sampler, loader in (self._data["train"], self._data["val"]))
        model.train(was_training)
        k = self.c.KNN_EVAL
        out = {"knn_top1": knn_top1(tr_f, tr_y, va_f, va_y, k=k.TOPK, temperature=k.TEMPERATURE, train_valid=tr_v,
                                    test_valid=va_v)}
        if self.probe is not None:
            correct, rows = all_reduce_sum(self.probe.correct(va_f, va_y, va_v)).tolist()
            out["probe_top1"] = 100.0 * correct / rows
        return out

    def evaluate(self, engine, metrics, step: int, epochs_done: int, initial: bool = False) -> Dict[str, float]:
        """Evaluates and writes the record: before training (``knn_top1_init``; the probe is untrained then), or
        after an epoch (``knn_top1``, ``probe_top1``), with ``eval_s``, its cost."""
        t0 = time.perf_counter()
        figures = self.figures(engine)
        if initial:
            figures = {"knn_top1_init": figures["knn_top1"]}
        elapsed = time.perf_counter() - t0
        metrics.write({"step": step, "epoch": max(epochs_done - 1, 0), **figures, "eval_s": round(elapsed, 3)})
        logger.info("evaluation at step %d: %s (%.1f s)", step, ", ".join(f"{k} {v:.2f}%" for k, v in figures.items()),
                    elapsed)
        self.evaluated_at = step
        return figures

    def report(self, engine, metrics, step: int, epochs_done: int, results: Dict[str, Any], out_dir: str) -> None:
        """The run's closing figures: kNN (and probe) top-1 after training next to kNN top-1 at initialisation."""
        if self.evaluated_at != step:  # not evaluated at this step by the EVERY_N_EPOCHS schedule
            results.update(self.figures(engine))
        if "knn_top1_init" not in results:  # a resumed run: the figure its first part recorded
            init = last_record(out_dir, "knn_top1_init")
            results["knn_top1_init"] = init["knn_top1_init"] if init else float("nan")
        final = {k: results[k] for k in ("knn_top1", "knn_top1_init", "probe_top1") if k in results}
        metrics.write({"step": step, "epoch": epochs_done, **final})
        if self.ctx.rank == 0:
            probe = f" (online linear probe {results['probe_top1']:.2f}%)" if "probe_top1" in results else ""
            print(f"kNN top-1 (k={self.c.KNN_EVAL.TOPK}) on the held-out split: {results['knn_top1']:.2f}% after "
                  f"training{probe}, {results['knn_top1_init']:.2f}% at initialisation", flush=True)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"online_probe": self.probe.state_dict()} if self.probe else {}

    def load_state_dict(self, client: Dict[str, Any]) -> None:
        if self.probe is not None and "online_probe" in client:  # replicated: every rank loads the same state
            self.probe.load_state_dict(client["online_probe"])
