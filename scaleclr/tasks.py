"""What the Trainer's one loop optimises, chosen from the config (DESIGN.md: "Evaluation reuses the Trainer,
engines, launchers, checkpoints and logging: what differs is chosen from the config, not written as a second loop").

* :class:`SimCLRTask` (pretraining; arXiv 2002.05709, Alg. 1): views -> trunk + projection head -> InfoNCE over
  the gathered batch.
* :class:`LinearEvalTask` (``config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON`` + ``FREEZE_TRUNK_ONLY``; arXiv
  2002.05709 Sec. 4 / Appendix B.6, VISSL's ``benchmark/linear_image_classification``): labelled images -> frozen
  trunk (eval-mode BatchNorm, no gradient, under the engine's autocast) -> final average pool -> classifier
  (``mlp`` = Linear, or ``eval_mlp`` = BatchNorm + Linear) -> cross-entropy on the labels; test phases on
  ``config.DATA.TEST`` write exact ``linear_top1`` / ``linear_top5`` to ``metrics.jsonl`` and TensorBoard.

A task is built from the config and a :class:`TaskContext` (what it needs of the run, all known before the model
and the engine exist); the live parts of the run (the engine, the metric logger, the step) are handed to the
methods that use them. Both tasks implement :class:`Task`; the Trainer calls it at these points (everything else,
engines, checkpoints, resume, logging, launchers, is shared):

1. ``sync_bn_scope(model)``: the part of the model SyncBN converts, before the engine wraps it;
2. ``build_train_data()``: ``(dataset, sampler, loader)``, after the engine is set up;
3. ``start(engine)``: once per run, after resuming and opening the metrics (linear evaluation: builds the test
   split and, with ``PRECOMPUTE_FEATURES``, extracts the frozen features through the engine's model);
4. ``loss(output, batch)`` every step: the rank's mean loss as a device tensor (no host synchronisation);
5. ``end_epoch(engine, metrics, step, epochs_done, results)`` after each complete epoch, before its checkpoint
   (the test phase);
6. ``finish(results)`` after the last epoch; ``test_only(engine, metrics, step, epochs_done)`` for
   ``config.TEST_ONLY``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Protocol, Tuple

import torch

from scaleclr import builders
from scaleclr.config.validate_linear import is_linear_eval
from scaleclr.eval.linear import check_labels, evaluate_topk, extract_sharded_features, topk_percent

logger = logging.getLogger(__name__)

__all__ = ["Task", "TaskContext", "SimCLRTask", "LinearEvalTask", "build_task", "classifier_outputs"]


@dataclass(frozen=True)
class TaskContext:
    """What a task needs of the run, all decided before the model and the engine are built.

    Attributes:
        rank, world_size, local_world_size: this process's place.
        device: the training device.
        device_augmentation: the two-stage data path is on (``config.DATA.TRAIN.DEVICE_AUGMENTATION`` resolved).
        non_blocking: host-to-device copies are asynchronous (``config.DATA.ENABLE_ASYNC_GPU_COPY``).
        memory_format: the model's input format (``config.MODEL.CHANNELS_LAST`` resolved).
        out_dir: ``config.CHECKPOINT.DIR``.
    """
    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    device_augmentation: bool
    non_blocking: bool
    memory_format: torch.memory_format
    out_dir: str


class Task(Protocol):
    """What the Trainer's loop optimises (see the module docstring for when each method is called)."""

    name: str
    loss_fn: torch.nn.Module

    def sync_bn_scope(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def build_train_data(self) -> Tuple[Any, Any, Any]: ...

    def start(self, engine) -> None: ...

    def loss(self, output: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor: ...

    def end_epoch(self, engine, metrics, step: int, epochs_done: int, results: Dict[str, Any]) -> None: ...

    def finish(self, results: Dict[str, Any]) -> None: ...

    def test_only(self, engine, metrics, step: int, epochs_done: int) -> Dict[str, Any]: ...


class SimCLRTask:
    """SimCLR pretraining: ``loss = InfoNCE(model(views))`` (``config.LOSS.name``: the 2-crop or multicrop loss).

    Args:
        c: the ``config`` node.
        ctx: what the task needs of the run.
    """

    name = "simclr_pretraining"

    def __init__(self, c, ctx: TaskContext) -> None:
        self.c, self.ctx = c, ctx
        self.loss_fn = builders.build_loss(c)

    def sync_bn_scope(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def build_train_data(self) -> Tuple[Any, Any, Any]:
        return builders.build_train_data(self.c, self.ctx.rank, self.ctx.world_size,
                                         device_augmentation=self.ctx.device_augmentation)

    def start(self, engine) -> None:
        """Nothing to prepare."""

    def loss(self, output: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        """The own-anchor mean InfoNCE of the embeddings ``[num_crops·B, D]``, in fp32 even under autocast."""
        return self.loss_fn(output.float())

    def end_epoch(self, engine, metrics, step: int, epochs_done: int, results: Dict[str, Any]) -> None:
        """Pretraining has no test phase (the Trainer runs the kNN evaluation on its schedule)."""

    def finish(self, results: Dict[str, Any]) -> None:
        """Nothing to report beyond the kNN figures."""

    def test_only(self, engine, metrics, step: int, epochs_done: int) -> Dict[str, Any]:
        raise ValueError("config.TEST_ONLY needs linear evaluation (config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON)")


def classifier_outputs(c) -> int:
    """``C``: the classifier's output width, the last ``dims`` entry of ``config.MODEL.HEAD.PARAMS[0]``."""
    params = builders.plain(c.MODEL.HEAD.PARAMS)
    head = params[0]
    if isinstance(head[0], list):  # a composite head: its last module
        head = head[-1]
    return int(head[1]["dims"][-1])


class LinearEvalTask:
    """Linear evaluation of a frozen trunk (see the module docstring).

    Training batches are labelled images (``config.DATA.TRAIN``, ``LABEL_TYPE: standard``, one view) or, with
    ``PRECOMPUTE_FEATURES``, rows of features extracted once. The test phase runs after every
    ``config.TEST_EVERY_NUM_EPOCH`` epochs and after the last one (``config.TEST_MODEL``), on every rank's
    unshuffled shard of ``config.DATA.TEST``, in eval mode (the classifier's BatchNorm uses its running
    statistics) under the engine's autocast; the correct counts are summed over ranks (exact top-k).
    """

    name = "linear_evaluation"

    def __init__(self, c, ctx: TaskContext) -> None:
        self.c, self.ctx = c, ctx
        self.loss_fn = builders.build_loss(c)
        self.ks: List[int] = [int(k) for k in c.METERS.accuracy_list_meter.topk_values]
        self.num_classes = classifier_outputs(c)
        self.precompute = bool(c.MODEL.FEATURE_EVAL_SETTINGS.PRECOMPUTE_FEATURES)
        self.test_data = None  # (dataset, sampler, loader) of DATA.TEST, built by start()
        self._to_extract: Dict[str, Tuple[Any, Any, Any]] = {}  # split -> (image sampler, loader, feature dataset)

    def sync_bn_scope(self, model: torch.nn.Module) -> torch.nn.Module:
        """The classifier only: the frozen trunk runs in eval mode, with no batch statistics to synchronise."""
        return model.heads

    def build_train_data(self) -> Tuple[Any, Any, Any]:
        c, t = self.c, self.ctx
        if not self.precompute:
            dataset, sampler, loader = builders.build_train_data(c, t.rank, t.world_size,
                                                                 device_augmentation=t.device_augmentation)
            check_labels(dataset.source.labels, self.num_classes, "config.DATA.TRAIN")
            return dataset, sampler, loader
        images, image_sampler, image_loader = builders.build_eval_data(c, "TRAIN", t.rank, t.world_size)
        check_labels(images.source.labels, self.num_classes, "config.DATA.TRAIN")
        feats, sampler, loader = builders.build_feature_data(c, "TRAIN", len(images), t.rank, t.world_size,
                                                             shuffle=True)
        if not c.TEST_ONLY:
            self._to_extract["TRAIN"] = (image_sampler, image_loader, feats)
        return feats, sampler, loader

    def _build_test_data(self) -> None:
        c, t = self.c, self.ctx
        images, sampler, loader = builders.build_eval_data(c, "TEST", t.rank, t.world_size)
        check_labels(images.source.labels, self.num_classes, "config.DATA.TEST")
        if self.precompute:
            feats, f_sampler, f_loader = builders.build_feature_data(c, "TEST", len(images), t.rank, t.world_size,
                                                                     shuffle=False)
            self._to_extract["TEST"] = (sampler, loader, feats)
            self.test_data = (feats, f_sampler, f_loader)
        else:
            self.test_data = (images, sampler, loader)

    def start(self, engine) -> None:
        """Build the test split; with PRECOMPUTE_FEATURES extract the frozen features of each split once, through
        the engine's model (``forward(images, features_only=True)``), from the trunk the run actually holds
        (after resuming)."""
        if self.c.TEST_MODEL or self.c.TEST_ONLY:
            self._build_test_data()
        for split, (sampler, loader, feats) in list(self._to_extract.items()):
            t0 = time.perf_counter()
            model = engine.model
            with torch.no_grad(), engine.autocast():
                f, y = extract_sharded_features(lambda x: model(self._formatted(x), features_only=True), loader,
                                                sampler, self.ctx.device, non_blocking=self.ctx.non_blocking,
                                                path=self._feature_file(split))
            feats.fill(f, y)
            logger.info("PRECOMPUTE_FEATURES: %d x %d frozen features of config.DATA.%s extracted once (%.1f s); the "
                        "classifier trains on them", f.shape[0], f.shape[1], split, time.perf_counter() - t0)
        self._to_extract.clear()  # drops the image loaders (and their workers)

    def _feature_file(self, split: str) -> str:
        """``<CHECKPOINT.DIR>/precomputed_features/<split>.node<k>.f32``: one ``[N, F]`` float32 file per node."""
        folder = os.path.join(self.ctx.out_dir, "precomputed_features")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{split}.node{self.ctx.rank // self.ctx.local_world_size}.f32")

    def _formatted(self, x: torch.Tensor) -> torch.Tensor:
        """Image batches in the model's memory format (``config.MODEL.CHANNELS_LAST``); features as they are."""
        return x.contiguous(memory_format=self.ctx.memory_format) if x.dim() == 4 else x

    def loss(self, output: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of the logits ``[B, C]`` against ``batch["label"]`` ``[B]``, mean over the rank's rows."""
        target = batch["label"].to(self.ctx.device, non_blocking=self.ctx.non_blocking)
        return self.loss_fn(output, target)

    def end_epoch(self, engine, metrics, step: int, epochs_done: int, results: Dict[str, Any]) -> None:
        c = self.c
        if c.TEST_MODEL and (epochs_done % c.TEST_EVERY_NUM_EPOCH == 0 or epochs_done == c.OPTIMIZER.num_epochs):
            results.update(self.test(engine, metrics, step, epoch=epochs_done - 1))

    def test(self, engine, metrics, step: int, epoch: int) -> Dict[str, Any]:
        """One test phase: ``{"linear_top1": %, "linear_top5": %, ...}``, also written to metrics.jsonl (rank 0)."""
        _, sampler, loader = self.test_data  # built by start()
        model = engine.model
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), engine.autocast():
            counts = evaluate_topk(lambda x: model(self._formatted(x)), loader, sampler, self.ks, self.ctx.device,
                                   non_blocking=self.ctx.non_blocking)
        model.train(was_training)
        acc = topk_percent(counts, self.ks)  # the one collective of the phase
        rec = {f"linear_top{k}": acc[f"top{k}"] for k in self.ks}
        metrics.write({"step": step, "epoch": epoch, **rec, "test_images": acc["images"],
                       "test_time": round(time.perf_counter() - t0, 3)})
        logger.info("test phase (epoch %d): %s on %d images of config.DATA.TEST", epoch,
                    ", ".join(f"{k} {v:.2f}%" for k, v in rec.items()), acc["images"])
        return {**rec, "test_images": acc["images"]}

    def describe(self) -> str:
        kind = "BatchNorm + Linear" if builders.plain(self.c.MODEL.HEAD.PARAMS)[0][0] == "eval_mlp" else "Linear"
        return f"{kind} on the frozen final average pool{', precomputed features' if self.precompute else ''}"

    def _print(self, results: Dict[str, Any]) -> None:
        if self.ctx.rank == 0:
            figures = ", ".join(f"top-{k} {results[f'linear_top{k}']:.2f}%" for k in self.ks)
            print(f"linear evaluation on config.DATA.TEST ({results['test_images']} images): {figures} "
                  f"({self.describe()})", flush=True)

    def finish(self, results: Dict[str, Any]) -> None:
        """Print the last test phase's figures (the Trainer calls this once the run is complete)."""
        if "linear_top1" in results:
            self._print(results)

    def test_only(self, engine, metrics, step: int, epochs_done: int) -> Dict[str, Any]:
        """``config.TEST_ONLY``: one test phase of the model as built (WEIGHTS_INIT, with EVAL_TRUNK_AND_HEAD the
        classifier too), nothing trained or checkpointed."""
        results = self.test(engine, metrics, step, epoch=epochs_done)
        self._print(results)
        return results


def build_task(c, ctx: TaskContext) -> Task:
    """:class:`LinearEvalTask` when ``config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON``, else :class:`SimCLRTask`."""
    return LinearEvalTask(c, ctx) if is_linear_eval(c) else SimCLRTask(c, ctx)
