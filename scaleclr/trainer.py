"""The SimCLR training loop (Chen et al. 2020, arXiv 2002.05709), the same for every engine.

One step reads top to bottom: views -> forward (trunk + projection head) -> InfoNCE over the gathered
batch -> backward -> LARC/SGD step -> LR schedule -> log. The LR is a pure function of the iteration
(``where = iteration / total_iterations``, VISSL's per-step update), so a resumed run continues on the
same curve. Rank 0 shows a progress bar and writes ``metrics.jsonl`` and TensorBoard scalars; the logged
loss is the mean over ranks.
"""
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from scaleclr import builders
from scaleclr.checkpoint import CheckpointManager, tag_for
from scaleclr.config import to_yaml
from scaleclr.data.device_augment import batch_to_device, resolve_device_augmentation
from scaleclr.distributed.sync_bn import convert_sync_batchnorm, create_sync_bn_process_group, describe_sync_bn
from scaleclr.engines import build_engine
from scaleclr.eval.knn import extract_features, knn_top1
from scaleclr.metrics import MetricLogger, collective_device, reduce_mean, reduce_sum_int

logger = logging.getLogger(__name__)


def _maybe_inject_failure(rank: int, iteration: int) -> None:
    """Fault injection for launcher tests: SCALECLR_FAIL_AT="<rank>:<iteration>" raises there."""
    spec = os.environ.get("SCALECLR_FAIL_AT")
    if spec and spec == f"{rank}:{iteration}":
        raise RuntimeError(f"injected failure (SCALECLR_FAIL_AT={spec})")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the run stops and the last good checkpoint is left untouched."""


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (0-based)
    iteration: int = 0  # optimizer steps done so far
    iteration_in_epoch: int = 0  # steps done in the current epoch (mid-epoch resume)


class Trainer:
    """Builds every component from the `config` node and runs the loop.

    Args:
        root: the composed, validated and inferred config (``load_config``).
        rank, world_size, local_rank, local_world_size: this process's place (1 process: 0, 1, 0, 1).
        device: ``cuda:<local_rank>`` or ``cpu``.
    """

    def __init__(self, root: DictConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 local_world_size: int = 1, device: Optional[torch.device] = None):
        self.root, self.c = root, root.config
        c = self.c
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.out_dir = c.CHECKPOINT.DIR
        self.is_main = rank == 0

        model = builders.build_model(c)
        sbn = c.MODEL.SYNC_BN_CONFIG
        if sbn.CONVERT_BN_TO_SYNC_BN and world_size > 1:
            group = create_sync_bn_process_group(sbn.GROUP_SIZE, num_proc_per_node=local_world_size)
            model = convert_sync_batchnorm(model, sbn.SYNC_BN_TYPE, process_group=group,
                                           device=self.device)
        logger.info("BatchNorm: %s", describe_sync_bn(model))
        self.engine = build_engine(c.DISTRIBUTED.ENGINE, c, self.device, rank, world_size)
        self.engine.setup(model, builders.make_optimizer_factory(c))
        self.loss_fn = builders.build_loss(c)
        self.device_augmentation = resolve_device_augmentation(c.DATA.TRAIN.DEVICE_AUGMENTATION, self.device)
        self.dataset, self.sampler, self.loader = builders.build_train_data(
            c, rank, world_size, device_augmentation=self.device_augmentation)
        self.device_stage = builders.build_device_augmentation(c, self.device_augmentation)
        self.lr_at = builders.build_lr_schedule(c)
        self.iters_per_epoch = self.sampler.num_batches
        self.total_iters = c.OPTIMIZER.num_epochs * self.iters_per_epoch
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.out_dir)
        if c.CHECKPOINT.OVERWRITE_EXISTING and self.is_main:
            self.checkpoints.forget()  # old checkpoint files stay on disk; the new run no longer resumes them
            metrics_path = os.path.join(self.out_dir, "metrics.jsonl")
            if os.path.exists(metrics_path):
                os.replace(metrics_path, metrics_path + ".old")
        self.metrics = MetricLogger(self.out_dir, enabled=self.is_main,
                                    tensorboard=c.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD)
        self.images_per_step = c.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world_size
        self.skipped_images = 0

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> Dict[str, Any]:
        c = self.c
        resumed = self.maybe_resume()
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "train_config.yaml"), "w") as f:
                f.write(to_yaml(self.root))
        results: Dict[str, Any] = {}
        if c.KNN_EVAL.ENABLED and not resumed:
            results["knn_top1_init"] = self.knn_eval()
            self.metrics.write({"step": 0, "epoch": 0, "knn_top1_init": results["knn_top1_init"]})
        max_iters = c.TRAINER.MAX_ITERATIONS
        if 0 < max_iters <= self.state.iteration:
            logger.info("config.TRAINER.MAX_ITERATIONS=%d already reached (iteration %d): nothing to train",
                        max_iters, self.state.iteration)
            self.metrics.close()
            return results
        for epoch in range(self.state.epoch, c.OPTIMIZER.num_epochs):
            self.state.epoch = epoch
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            self.sampler.set_start_iter(self.state.iteration_in_epoch)
            self.metrics.start_epoch(epoch, self.iters_per_epoch, self.state.iteration_in_epoch,
                                     self.total_iters, self.state.iteration)
            data_start = time.perf_counter()
            for batch in self.loader:
                data_time = time.perf_counter() - data_start
                loss = self.train_step(batch, data_time)
                results["last_loss"] = loss
                if self._iteration_checkpoint_due():
                    self.save_checkpoint(end_of_epoch=False)
                data_start = time.perf_counter()
                if 0 < max_iters <= self.state.iteration:
                    break
            epoch_loss = self.metrics.end_epoch()
            if self.state.iteration_in_epoch < self.iters_per_epoch:  # stopped by MAX_ITERATIONS
                self.save_checkpoint(end_of_epoch=False)
                break
            results["epoch_loss"] = epoch_loss
            self.state.epoch, self.state.iteration_in_epoch = epoch + 1, 0
            last = epoch + 1 == c.OPTIMIZER.num_epochs
            # VISSL's rule: after phase `epoch` when epoch % CHECKPOINT_FREQUENCY == 0, and after the last one
            if last or epoch % c.CHECKPOINT.CHECKPOINT_FREQUENCY == 0 or 0 < max_iters <= self.state.iteration:
                self.save_checkpoint(end_of_epoch=True, final=last)
            if 0 < max_iters <= self.state.iteration:
                break
        if c.KNN_EVAL.ENABLED:
            results["knn_top1"] = self.knn_eval()
            if "knn_top1_init" not in results:
                results["knn_top1_init"] = self._logged_knn_init()
            self.metrics.write({"step": self.state.iteration, "epoch": self.state.epoch, **{
                k: results[k] for k in ("knn_top1", "knn_top1_init")}})
            if self.is_main:
                print(f"kNN top-1 (k={c.KNN_EVAL.TOPK}) on the held-out split: "
                      f"{results['knn_top1']:.2f}% after training, {results['knn_top1_init']:.2f}% at "
                      f"initialisation", flush=True)
        self.metrics.close()
        return results

    def train_step(self, batch: Dict[str, Any], data_time: float) -> float:
        start = time.perf_counter()
        _maybe_inject_failure(self.rank, self.state.iteration)
        batch = batch_to_device(batch, self.device)  # data (uint8 with device augmentation) + aug_params
        views = self.device_stage(batch)  # colour, blur, normalisation on the device; identity when off
        lr = self.lr_at(self.state.iteration / self.total_iters)
        self.engine.set_lr(lr)

        with self.engine.autocast():
            embedding = self.engine.model(views)  # [num_crops * B, D], crop-major
        loss = self.loss_fn(embedding.float())  # own-anchor mean; fp32 even under autocast

        loss_value = reduce_mean(loss.detach(), self.world_size)  # mean over ranks, for logging
        if self.c.HOOKS.CHECK_NAN and not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at iteration {self.state.iteration} (epoch {self.state.epoch}); "
                "stopping. The last good checkpoint in " f"{self.out_dir} is untouched. Try a lower LR, "
                "AMP_DTYPE=bfloat16, or a larger temperature.")
        self.engine.backward(loss)
        self.engine.step()
        self.engine.zero_grad()

        self.state.iteration += 1
        self.state.iteration_in_epoch += 1
        self.skipped_images += int(batch.get("skipped", 0))
        step_time = time.perf_counter() - start
        self.metrics.log_step(step=self.state.iteration, epoch=self.state.epoch, loss=loss_value, lr=lr,
                              images=self.images_per_step, data_time=data_time, step_time=step_time,
                              skipped_images=self.skipped_images, every=self.c.LOG_FREQUENCY)
        return loss_value

    # ------------------------------------------------------------------------------- checkpoints
    def _iteration_checkpoint_due(self) -> bool:
        f = self.c.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY
        return f > 0 and self.state.iteration % f == 0 and self.state.iteration_in_epoch < self.iters_per_epoch

    def client_state(self) -> Dict[str, Any]:
        return {"train_state": asdict(self.state), "iters_per_epoch": self.iters_per_epoch,
                "world_size": self.world_size, "rng_cpu": torch.get_rng_state(),
                "skipped_images": reduce_sum_int(self.skipped_images, self.world_size)}

    def save_checkpoint(self, end_of_epoch: bool, final: bool = False) -> Optional[str]:
        epoch = self.state.epoch - 1 if end_of_epoch else self.state.epoch
        tag = tag_for(epoch, self.state.iteration, final, end_of_epoch)
        if tag == getattr(self, "_last_saved_tag", None):
            return None  # already written at this iteration (never rewrite the checkpoint 'latest' points at)
        self._last_saved_tag = tag
        path = self.engine.save(self.out_dir, tag, self.client_state())
        if self.is_main:
            self.checkpoints.record(path, self.engine.name, self.state.epoch, self.state.iteration, final)
            logger.info("checkpoint %s written (iteration %d)", path, self.state.iteration)
        return path

    def maybe_resume(self) -> bool:
        c = self.c.CHECKPOINT
        if not c.AUTO_RESUME or c.OVERWRITE_EXISTING:
            return False
        entry = self.checkpoints.latest(c.LATEST_CHECKPOINT_RESUME_FILE_NUM)
        if dist.is_initialized() and self.world_size > 1:
            # rank 0 decides: ranks reading a shared file system on their own could disagree and then hang
            # in different collective loads
            box = [entry]
            dist.broadcast_object_list(box, src=0)
            entry = box[0]
        if entry is None:
            return False
        if entry["engine"] != self.engine.name:
            raise ValueError(f"{entry['abspath']} was written by the {entry['engine']!r} engine but "
                             f"config.DISTRIBUTED.ENGINE={self.engine.name}; resume with the same engine.")
        client = self.engine.load(entry["abspath"])
        if client["iters_per_epoch"] != self.iters_per_epoch and client["train_state"]["iteration_in_epoch"]:
            raise ValueError(f"{entry['abspath']} stopped mid-epoch with {client['iters_per_epoch']} iterations "
                             f"per epoch but this run has {self.iters_per_epoch} (world size "
                             f"{client['world_size']} -> {self.world_size}); resume with the same world size "
                             "and batch size, or from an end-of-epoch checkpoint.")
        self.state = TrainState(**client["train_state"])
        if client["iters_per_epoch"] != self.iters_per_epoch:
            self.state.iteration = self.state.epoch * self.iters_per_epoch
        # the count is summed over ranks when logged: rank 0 carries the restored total
        self.skipped_images = int(client.get("skipped_images", 0)) if self.is_main else 0
        torch.set_rng_state(client["rng_cpu"])
        logger.info("resumed from %s at epoch %d, iteration %d", entry["abspath"], self.state.epoch,
                    self.state.iteration)
        return True

    # ------------------------------------------------------------------------------------- eval
    def knn_eval(self) -> float:
        """kNN top-1 (%) of the trunk on the held-out split; computed on rank 0 (on its device, with the
        data-loader workers), broadcast to all. The other ranks wait in the broadcast, so the labelled
        split must be extracted within config.DISTRIBUTED.TIMEOUT_SECONDS."""
        state = self.engine.full_state_dict()  # collective for sharded engines
        acc = torch.zeros(1, dtype=torch.float64, device=collective_device())
        if self.is_main:
            model = builders.build_model(self.c)
            model.load_state_dict(state)
            model.to(self.device).eval()
            train_loader, val_loader = builders.build_knn_loaders(self.c)
            k = self.c.KNN_EVAL
            tr_f, tr_l = extract_features(model.trunk_features, train_loader, device=self.device)
            va_f, va_l = extract_features(model.trunk_features, val_loader, device=self.device)
            acc[0] = knn_top1(tr_f, tr_l, va_f, va_l, k=k.TOPK, temperature=k.TEMPERATURE)
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast(acc, src=0)
        return float(acc[0].cpu())

    def _logged_knn_init(self) -> float:
        path = os.path.join(self.out_dir, "metrics.jsonl")
        found = float("nan")
        if os.path.exists(path):
            for line in open(path):
                rec = json.loads(line)
                if "knn_top1_init" in rec:
                    found = rec["knn_top1_init"]
        return found
