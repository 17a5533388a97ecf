"""The SimCLR training loop (Chen et al. 2020, arXiv 2002.05709), the same for every engine.

One step reads top to bottom: views -> forward (trunk + projection head) -> InfoNCE over the gathered
batch -> backward -> LARC/SGD step. The LR is a pure function of the step (``where = step / total_steps``,
VISSL's per-step update), so a resumed run continues on the same curve. What differs for linear evaluation
(frozen trunk + classifier, cross-entropy on labels, top-k test phases) is a task chosen from the config
(``scaleclr.tasks``), not a second loop.

No host synchronisation in the hot path: the loss is accumulated on the device; every ``LOG_FREQUENCY``
steps (and before every checkpoint and at every epoch end) one all-reduce brings the window's loss sums,
the non-finite count and the skipped-image count to every rank, and only then are values read on the host.
A NaN/Inf loss therefore stops the run at the next such point, naming the first bad step; it never reaches
a checkpoint. Rank 0 shows a progress bar and writes ``metrics.jsonl`` and TensorBoard scalars.

Stopping on a signal (``config.TRAINER.STOP_SIGNALS``, :mod:`scaleclr.distributed.stop`): the handler only
sets a flag; :meth:`Trainer.stop_reason` asks the ranks at each step boundary (one int all-reduce on a CPU
group) and the usual stop path writes the checkpoint of that exact step (``model_iteration{step}``
mid-epoch); ``train()`` then reports ``stopped_by`` and ``scaleclr.launch.worker`` exits with ``EXIT_RESUMABLE``.
"""
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from scaleclr import builders
from scaleclr.checkpoint import CheckpointManager, tag_for
from scaleclr.config import to_yaml
from scaleclr.data.device_augment import resolve_device_augmentation
from scaleclr.distributed.collectives import all_reduce_sum, collective_device, is_distributed
from scaleclr.distributed.compile import sync_bn_type_for_compile
from scaleclr.distributed.env import barrier
from scaleclr.distributed.stop import StopSignal, control_group
from scaleclr.distributed.sync_bn import convert_sync_batchnorm, create_sync_bn_process_group, describe_sync_bn
from scaleclr.engines import build_engine
from scaleclr.interchange.checkpoints import migrate_checkpoint, write_consolidated
from scaleclr.io import fsync_dir
from scaleclr.metrics import METRICS_FILE, MetricLogger
from scaleclr.runlock import RunLock
from scaleclr.monitor import Monitor
from scaleclr.tasks import TaskContext, build_task

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the run stops and the last good checkpoint is left untouched."""


@dataclass
class TrainState:
    """Progress, as a checkpoint records it.

    Attributes:
        epochs_done: complete epochs (the epoch in progress has index ``epochs_done``).
        step: optimizer steps done since the start of the run.
        step_in_epoch: steps done in the epoch in progress (mid-epoch resume).
    """

    epochs_done: int = 0
    step: int = 0
    step_in_epoch: int = 0

    @classmethod
    def from_checkpoint(cls, d: Dict[str, int]) -> "TrainState":
        return cls(**d)  # migrate_checkpoint brings older layouts to this one


class StepStats:
    """Per-rank sums kept on the training device between two reads (no host sync per step).

    ``window`` holds the steps since the last logged record, ``epoch`` those of the epoch in progress.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start_epoch()
        self.start_window()
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def start_window(self) -> None:
        self.window_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.last = torch.zeros((), dtype=torch.float64, device=self.device)
        self.window_steps, self.data_time, self.t0 = 0, 0.0, time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.epoch_steps = 0

    def add(self, loss: torch.Tensor, step: int, data_time: float) -> None:
        loss = loss.detach().to(torch.float64)
        bad = ~torch.isfinite(loss)
        self.nonfinite += bad
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.last = loss
        self.window_sum += loss
        self.epoch_sum += loss
        self.window_steps += 1
        self.epoch_steps += 1
        self.data_time += data_time


def _raise_on_every_rank(error: Optional[BaseException]) -> None:
    """Rank 0 decided something the others wait for (a broadcast): raise its error, of the same type, on every rank
    (a rank 0 that raised alone would leave the others in the collective until the timeout)."""
    if is_distributed():
        box = [None if error is None else (type(error), str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            kind, message = box[0]
            try:
                error = kind(message)
            except Exception:  # noqa: BLE001 - an exception type that takes other arguments
                error = RuntimeError(f"rank 0: {kind.__name__}: {message}")
    if error is not None:
        raise error


class Trainer:
    """Builds every component from the `config` node and runs the loop.

    Args:
        root: the composed, validated and inferred config (``load_config``).
        rank, world_size, local_rank, local_world_size: this process's place (1 process: 0, 1, 0, 1).
        device: ``cuda:<local_rank>`` or ``cpu``.
        stop: the process's installed stop handler (``scaleclr.launch.worker``); None: never stops on a signal.
    """

    def __init__(self, root: DictConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 local_world_size: int = 1, device: Optional[torch.device] = None,
                 stop: Optional[StopSignal] = None):
        self.root, self.c = root, root.config
        c = self.c
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.out_dir = c.CHECKPOINT.DIR
        self.is_main = rank == 0

        spec = builders.build_engine_spec(c, world_size, self.device)
        self.device_augmentation = resolve_device_augmentation(c.DATA.TRAIN.DEVICE_AUGMENTATION, self.device)
        # asynchronous copies only from page-locked batches (from pageable memory a non_blocking copy is a blocking
        # one in disguise): ENABLE_ASYNC_GPU_COPY and loaders that pin (config.DATA.PIN_MEMORY on CUDA)
        self.non_blocking = bool(c.DATA.ENABLE_ASYNC_GPU_COPY) and builders.pin_memory(c)
        self.memory_format = torch.channels_last if spec.precision.channels_last else torch.contiguous_format
        ctx = TaskContext(rank=rank, world_size=world_size, local_world_size=local_world_size, device=self.device,
                          device_augmentation=self.device_augmentation, non_blocking=self.non_blocking,
                          memory_format=self.memory_format, out_dir=self.out_dir)
        self.task = build_task(c, ctx)  # SimCLR pretraining or linear evaluation
        model = builders.build_model(c)
        sbn = c.MODEL.SYNC_BN_CONFIG
        if sbn.CONVERT_BN_TO_SYNC_BN and world_size > 1:
            group = create_sync_bn_process_group(sbn.GROUP_SIZE, num_proc_per_node=local_world_size)
            sync_bn_type = sync_bn_type_for_compile(sbn.SYNC_BN_TYPE, c.MODEL.TORCH_COMPILE)  # torch's breaks graphs
            convert_sync_batchnorm(self.task.sync_bn_scope(model), sync_bn_type, process_group=group,
                                   device=self.device)  # in place
        logger.info("BatchNorm: %s", describe_sync_bn(model))
        self.engine = build_engine(spec, self.device, rank, world_size)
        self.engine.setup(model, builders.make_optimizer_factory(c))
        self.loss_fn = self.task.loss_fn
        self.dataset, self.sampler, self.loader = self.task.build_train_data()
        self.device_stage = builders.build_device_augmentation(c, self.device_augmentation)
        self.monitor = Monitor(c, ctx, model.trunk.num_features, self.dataset)
        self.lr_at, self.head_lr_at = builders.build_lr_schedules(c)
        self.steps_per_epoch = self.sampler.num_batches
        self.total_steps = c.OPTIMIZER.num_epochs * self.steps_per_epoch
        self.state = TrainState()
        self.checkpoints = CheckpointManager(self.out_dir, keep_last=c.CHECKPOINT.KEEP_LAST,
                                             epoch_frequency=c.CHECKPOINT.CHECKPOINT_FREQUENCY)
        self.images_per_step = c.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world_size
        self.skipped_images = 0  # this rank's count; summed over ranks when logged
        self.stats = StepStats(self.device)
        self.metrics: Optional[MetricLogger] = None
        self._last_saved_tag: Optional[str] = None
        self._last_save_s = 0.0
        self._start_step = 0
        self._epoch_carry: Optional[tuple] = None  # (global loss sum, steps) of a resumed epoch's first part
        self.stop = (stop or StopSignal()).bind(control_group())  # collective: every rank builds a Trainer

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> Dict[str, Any]:
        """Train (or resume, or test) in CHECKPOINT.DIR, which rank 0 holds locked throughout
        (:mod:`scaleclr.runlock`; :class:`RunDirLocked` on every rank when another run owns it)."""
        lock = self._lock_run_dir()
        try:
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _lock_run_dir(self) -> Optional[RunLock]:
        lock, error = None, None
        if self.is_main:
            try:
                lock = RunLock(self.out_dir, stale_s=60 * self.c.CHECKPOINT.LOCK_STALE_MINUTES).acquire()
            except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast, then raise the same
                error = e
        _raise_on_every_rank(error)
        return lock

    def _train(self) -> Dict[str, Any]:
        c = self.c
        results: Dict[str, Any] = {}
        resumed = False if c.TEST_ONLY else self.maybe_resume()
        if resumed == "finished":
            return results
        self.stop.progress = self._start_step = self.state.step
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "train_config.yaml"), "w") as f:
                f.write(to_yaml(self.root))
        self.metrics = MetricLogger(self.out_dir, enabled=self.is_main,
                                    tensorboard=c.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD,
                                    resume_step=self.state.step if resumed else None)
        try:
            self.task.start(self.engine)
            if c.TEST_ONLY:
                return self.task.test_only(self.engine, self.metrics, self.state.step, self.state.epochs_done)
            if c.KNN_EVAL.ENABLED and not resumed:
                results.update(self.monitor.evaluate(self.engine, self.metrics, self.state.step,
                                                     self.state.epochs_done, initial=True))
            if self.should_stop():
                logger.info("nothing to train: %s", self.stop_reason())
            while not self.should_stop():
                self.run_epoch(results)
            if self.stopped_by_signal():
                results["stopped_by"] = self._report_signal_stop()
            else:
                if self.state.epochs_done >= c.OPTIMIZER.num_epochs:
                    self.task.finish(results)
                if c.KNN_EVAL.ENABLED:
                    self.monitor.report(self.engine, self.metrics, self.state.step, self.state.epochs_done, results,
                                        self.out_dir)
        finally:
            self.metrics.close()
        return results

    def should_stop(self) -> bool:
        """True when the run must stop at this step boundary (every rank decides the same)."""
        return self.stop_reason() is not None

    def stop_reason(self) -> Optional[str]:
        done = self._done_reason()
        if done is None and self.stop.agree(self.state.step):
            return f"{self.stop.name} received: stopping after step {self.stop.agreed_step}"
        return done

    def _done_reason(self) -> Optional[str]:
        """Why the run is complete at this step (MAX_ITERATIONS or all epochs), or None."""
        max_steps = self.c.TRAINER.MAX_ITERATIONS
        if 0 < max_steps <= self.state.step:
            return f"config.TRAINER.MAX_ITERATIONS={max_steps} reached (step {self.state.step})"
        if self.state.epochs_done >= self.c.OPTIMIZER.num_epochs:
            return f"all {self.c.OPTIMIZER.num_epochs} epochs done"
        return None

    def stopped_by_signal(self) -> bool:
        """The run stopped on a signal before completing: resuming it continues the training."""
        return self.stop.agreed_step is not None and self._done_reason() is None

    def _report_signal_stop(self) -> Dict[str, Any]:
        """Log and record the stop (the checkpoint of the agreed step is written by then)."""
        elapsed = self.stop.seconds_since_signal()
        info = {"signal": self.stop.name, "step": self.state.step, "checkpoint": self._last_saved_tag,
                "save_s": round(self._last_save_s, 3)}
        if elapsed is not None:  # this rank got the signal itself: how long it took and how far it went
            info.update(signal_to_checkpoint_s=round(elapsed, 3),
                        steps_after_signal=self.state.step - max(self.stop.progress_at_signal, self._start_step))
        self.metrics.write({"step": self.state.step, "epoch": self.state.epochs_done, "stop_signal": info["signal"],
                            **{k: v for k, v in info.items() if k not in ("signal", "step")}})
        if self.is_main:
            logger.info("stopped on %s after step %d: checkpoint %s written%s; rerun the same command to resume",
                        info["signal"], self.state.step, info["checkpoint"],
                        "" if elapsed is None else f" {elapsed:.2f} s after the signal")
        return info

    def run_epoch(self, results: Dict[str, Any]) -> None:
        c = self.c
        epoch = self.state.epochs_done
        self.sampler.set_epoch(epoch)  # keeps a resumed epoch's offset (maybe_resume), else starts at 0
        self.dataset.set_epoch(epoch)
        self.metrics.start_epoch(epoch, self.steps_per_epoch, self.state.step_in_epoch, self.total_steps,
                                 self.state.step)
        self.stats.start_epoch()
        if self._epoch_carry is not None:  # resumed mid-epoch: the epoch's loss covers its first part too
            self.stats.epoch_sum += self._epoch_carry[0] if self.is_main else 0.0
            self.stats.epoch_steps += self._epoch_carry[1]
            self._epoch_carry = None
        self.stats.start_window()
        data_start = time.perf_counter()
        for batch in self.loader:
            self.train_step(batch, time.perf_counter() - data_start)
            if self.state.step % c.LOG_FREQUENCY == 0:
                self.log_window()
            if self._step_checkpoint_due():
                self.save_checkpoint(end_of_epoch=False)
            if self.should_stop():
                break
            data_start = time.perf_counter()
        self.metrics.end_epoch()
        if self.state.step_in_epoch < self.steps_per_epoch:  # stopped mid-epoch: its record comes at its end
            self.save_checkpoint(end_of_epoch=False)
            return
        results["epoch_loss"] = self.end_epoch_stats(epoch)
        self.state.epochs_done, self.state.step_in_epoch = epoch + 1, 0
        # linear evaluation's test phase, before the epoch's checkpoint
        self.task.end_epoch(self.engine, self.metrics, self.state.step, self.state.epochs_done, results)
        if self.monitor.due(self.state.epochs_done):  # before the checkpoint: a resume neither repeats nor skips it
            results.update(self.monitor.evaluate(self.engine, self.metrics, self.state.step, self.state.epochs_done))
        last = self.state.epochs_done == c.OPTIMIZER.num_epochs
        # VISSL's rule: after phase `epoch` when epoch % CHECKPOINT_FREQUENCY == 0, and after the last one
        if last or epoch % c.CHECKPOINT.CHECKPOINT_FREQUENCY == 0 or self.should_stop():
            self.save_checkpoint(end_of_epoch=True, final=last)

    def prepare_views(self, batch: Dict[str, Any]):
        """The batch's views on the training device, in the model's memory format: ``[V*B, 3, H, W]`` or a
        list of ``C`` crops ``[B, 3, H_c, W_c]``. With device augmentation the batch holds uint8 views and
        their parameters (``aug_params``): both are copied, and the device stage (colour distortion, blur,
        normalisation) runs here, with the loader's CPU copy of the parameters for its host-side grouping."""
        def move(v, **kw):
            if isinstance(v, (list, tuple)):
                return [move(t, **kw) for t in v]
            if v.dim() != 4:  # e.g. precomputed features [B, F] (linear evaluation): no memory format
                kw.pop("memory_format", None)
            return v.to(self.device, non_blocking=self.non_blocking, **kw)

        if not self.device_stage.enabled:
            return move(batch["data"], memory_format=self.memory_format)
        views = self.device_stage({"data": move(batch["data"]), "aug_params": move(batch["aug_params"]),
                                   "aug_params_host": batch["aug_params"]})
        fmt = lambda v: v.contiguous(memory_format=self.memory_format)  # noqa: E731
        return [fmt(v) for v in views] if isinstance(views, list) else fmt(views)

    def train_step(self, batch: Dict[str, Any], data_time: float) -> torch.Tensor:
        """One optimizer step on ``batch``; returns the rank's loss as a device tensor (no host sync)."""
        timed = self.engine.spec.precision.compile and self.state.step < 2  # torch.compile compiles lazily
        t0 = time.perf_counter()
        views = self.prepare_views(batch)
        where = self.state.step / self.total_steps
        self.engine.set_lr(self.lr_at(where), self.head_lr_at(where) if self.head_lr_at else None)

        with self.engine.autocast():
            embedding = self.engine.model(views, **self.monitor.forward_kwargs)
        if self.monitor.probe:  # (embeddings, trunk features [num_crops * B, F])
            embedding, features = embedding
        loss = self.task.loss(embedding, batch)  # the rank's mean loss (InfoNCE / cross-entropy), fp32
        self.engine.backward(loss)
        self.engine.step()
        self.engine.zero_grad()
        if self.monitor.probe:  # no gradient reaches the trunk: the probe reads detached features
            self.monitor.train_step(features, batch)

        self.state.step += 1
        self.state.step_in_epoch += 1
        if timed:
            logger.info("step %d took %.1f s%s", self.state.step, time.perf_counter() - t0,
                        " (includes torch.compile's compilation)" if self.state.step == 1 else "")
        self.skipped_images += int(batch.get("skipped", 0))
        self.stats.add(loss, self.state.step, data_time)
        self.stop.progress = self.state.step
        if self.metrics is not None:
            self.metrics.tick(self.state.step)
        return loss

    # ------------------------------------------------------------------------------------ reductions
    def _scalar(self, x: float) -> torch.Tensor:
        return torch.tensor(float(x), dtype=torch.float64, device=self.device)

    def _reduce(self, values: List[torch.Tensor]) -> List[float]:
        """Sum float64 scalars over ranks and read them on the host (the one sync point of a window)."""
        vec = torch.stack([v.to(torch.float64).reshape(()) for v in values])
        return all_reduce_sum(vec).tolist()

    def _raise_if_nonfinite(self, count: float) -> None:
        if count == 0 or not self.c.HOOKS.CHECK_NAN:
            return
        first = self.stats.first_bad.clone()
        first = torch.where(first < 0, torch.iinfo(torch.int64).max, first)
        if is_distributed():
            first = first.to(collective_device())
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        raise NonFiniteLossError(
            f"the loss is not finite at step {int(first)} (epoch {self.state.epochs_done}); stopping. The last good "
            f"checkpoint in {self.out_dir} is untouched. Try a lower LR, AMP_DTYPE=bfloat16, or a larger "
            "temperature.")

    def log_window(self) -> None:
        s = self.stats
        last, window_sum, nonfinite, skipped = self._reduce(
            [s.last, s.window_sum, s.nonfinite, self._scalar(self.skipped_images)])
        self._raise_if_nonfinite(nonfinite)
        n, wall = s.window_steps, time.perf_counter() - s.t0
        where = (self.state.step - 1) / self.total_steps
        self.metrics.log_step({
            "step": self.state.step, "epoch": self.state.epochs_done, "loss": last / self.world_size,
            "loss_avg": window_sum / (n * self.world_size), "lr": self.lr_at(where),
            "images_per_sec": self.images_per_step * n / max(wall, 1e-9), "data_time": s.data_time / n,
            "step_time": max(wall - s.data_time, 0.0) / n, "skipped_images": int(skipped)})
        s.start_window()

    def end_epoch_stats(self, epoch: int) -> Optional[float]:
        s = self.stats
        if s.epoch_steps == 0:
            return None
        epoch_sum, nonfinite = self._reduce([s.epoch_sum, s.nonfinite])
        self._raise_if_nonfinite(nonfinite)
        mean = epoch_sum / (s.epoch_steps * self.world_size)
        self.metrics.write({"step": self.state.step, "epoch": epoch, "epoch_loss": mean, "steps": s.epoch_steps})
        return mean

    # ------------------------------------------------------------------------------- checkpoints
    def _step_checkpoint_due(self) -> bool:
        f = self.c.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY
        return f > 0 and self.state.step % f == 0 and self.state.step_in_epoch < self.steps_per_epoch

    def _rng_states(self) -> Dict[str, Any]:
        """Every rank's CPU and CUDA generator states (rank-major lists), gathered on every rank."""
        mine = {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        if not is_distributed():
            return {"cpu": [mine["cpu"]], "cuda": [mine["cuda"]]}
        everyone: List[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        return {"cpu": [e["cpu"] for e in everyone], "cuda": [e["cuda"] for e in everyone]}

    def client_state(self) -> Dict[str, Any]:
        skipped, epoch_sum = self._reduce([self._scalar(self.skipped_images), self.stats.epoch_sum])
        mid_epoch = 0 < self.state.step_in_epoch < self.steps_per_epoch
        return {"train_state": asdict(self.state), "steps_per_epoch": self.steps_per_epoch,
                "sampler": self.sampler.state_dict(iteration=self.state.step_in_epoch, epoch=self.state.epochs_done),
                "world_size": self.world_size, "rng": self._rng_states(), "skipped_images": int(skipped),
                "epoch_loss_sum": epoch_sum if mid_epoch else 0.0,
                "epoch_steps": self.stats.epoch_steps if mid_epoch else 0,
                **self.monitor.state_dict()}

    def save_checkpoint(self, end_of_epoch: bool, final: bool = False) -> Optional[str]:
        tag = tag_for(self.state.epochs_done, self.state.step, end_of_epoch, final)
        if tag == self._last_saved_tag:
            return None  # already written at this step (never rewrite the checkpoint 'latest' points at)
        self._raise_if_nonfinite(self._reduce([self.stats.nonfinite])[0])  # never checkpoint a NaN model
        t0 = time.perf_counter()
        path = self.engine.save(self.out_dir, tag, self.client_state(), final=final)
        if final and self.engine.consolidate_final:  # before the pointer names it: one unit with its checkpoint
            write_consolidated(self.engine, path, tag)
        self._last_saved_tag = tag
        if self.is_main:
            self.checkpoints.record(path, self.engine.name, self.state.epochs_done, self.state.step, final)
            logger.info("checkpoint %s written (step %d)", path, self.state.step)
        barrier()  # 'latest' points at it before any rank goes on (or exits: srun --kill-on-bad-exit)
        self._last_save_s = time.perf_counter() - t0
        return path

    def _choose_checkpoint(self, failed: Dict[str, str]) -> Optional[Dict[str, Any]]:
        """Rank 0 reads the pointer and verifies the candidates (``CheckpointManager.choose_resume``), and every
        rank gets its choice: ranks reading a shared file system on their own could disagree and then hang in
        different collective loads. ``failed``: checkpoints the engine could not load, skipped."""
        c = self.c.CHECKPOINT
        entry, error = None, None
        if self.is_main and c.AUTO_RESUME and not c.OVERWRITE_EXISTING:
            try:
                entry = self.checkpoints.choose_resume(c.LATEST_CHECKPOINT_RESUME_FILE_NUM, c.ON_CORRUPT, failed)
            except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast, then raise the same
                error = e
        if is_distributed():
            box = [entry]
            dist.broadcast_object_list(box, src=0)
            entry = box[0]
        _raise_on_every_rank(error)
        return entry

    def _load(self, entry: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The engine's load of ``entry``; None (on every rank) when it failed on any rank (the failure is
        logged and recorded for :meth:`_choose_checkpoint`). An engine's ValueError (a user error) propagates."""
        client, reason = None, None
        try:
            client = self.engine.load(entry["abspath"])
        except (KeyboardInterrupt, SystemExit, ValueError):
            raise
        except BaseException as e:  # torch.load / DCP (CheckpointException is a BaseException) / DeepSpeed
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("rank %d could not load %s: %s", self.rank, entry["abspath"], reason)
        if all_reduce_sum(torch.tensor([float(reason is not None)])).item() == 0:
            return client
        self._load_failures[entry["path"]] = reason or "another rank could not load it"
        return None

    def maybe_resume(self):
        """Resume from the latest checkpoint: returns False (fresh start), True (resumed), or ``"finished"``."""
        c = self.c
        if c.CHECKPOINT.OVERWRITE_EXISTING and self.is_main:
            self.checkpoints.forget()  # old checkpoint files stay on disk; the new run no longer resumes them
            metrics_path = os.path.join(self.out_dir, METRICS_FILE)
            if os.path.exists(metrics_path):
                os.replace(metrics_path, metrics_path + ".old")
                fsync_dir(self.out_dir)
        self._load_failures: Dict[str, str] = {}
        client = None
        while client is None:  # the newest checkpoint that verifies and loads (choose_resume names the others)
            entry = self._choose_checkpoint(self._load_failures)
            if entry is None:
                return False
            if entry["final"] and entry["epochs_done"] >= c.OPTIMIZER.num_epochs:
                if self.is_main:
                    logger.info("training already finished in %s (%s); set config.CHECKPOINT.OVERWRITE_EXISTING="
                                "True or another config.CHECKPOINT.DIR to train again", self.out_dir, entry["path"])
                return "finished"
            if entry["engine"] != self.engine.name:
                raise ValueError(f"{entry['abspath']} was written by the {entry['engine']!r} engine but "
                                 f"config.DISTRIBUTED.ENGINE={self.engine.name}; resume with the same engine.")
            client = self._load(entry)
        client = migrate_checkpoint(client, self.sampler.global_batch_size)
        state = TrainState.from_checkpoint(client["train_state"])
        saved_spe = client["steps_per_epoch"]
        if saved_spe != self.steps_per_epoch and state.step_in_epoch:
            raise ValueError(f"{entry['abspath']} stopped mid-epoch with {saved_spe} steps per epoch but this run "
                             f"has {self.steps_per_epoch} (world size {client['world_size']} -> {self.world_size});"
                             " resume with the same world size and batch size, or from an end-of-epoch checkpoint.")
        if saved_spe != self.steps_per_epoch:
            state.step = state.epochs_done * self.steps_per_epoch
        self.state = state
        self.sampler.load_state_dict(client["sampler"])  # checks the data and the seed, skips consumed batches
        # the count is summed over ranks when logged: rank 0 carries the restored total
        self.skipped_images = int(client.get("skipped_images", 0)) if self.is_main else 0
        if state.step_in_epoch and client.get("epoch_steps"):
            self._epoch_carry = (float(client["epoch_loss_sum"]), int(client["epoch_steps"]))
        self._restore_rng(client)
        self.monitor.load_state_dict(client)
        self._last_saved_tag = entry["path"].rsplit(".torch", 1)[0]
        logger.info("resumed from %s: %d epochs done, step %d", entry["abspath"], state.epochs_done, state.step)
        return True

    def _restore_rng(self, client: Dict[str, Any]) -> None:
        cpu, cuda = client["rng"]["cpu"], client["rng"]["cuda"]
        if len(cpu) != self.world_size:
            logger.warning("the checkpoint holds the RNG states of %d ranks, this run has %d: rank r takes state "
                           "r mod %d (random ops such as dropout do not continue exactly)", len(cpu),
                           self.world_size, len(cpu))
        i = self.rank % len(cpu)
        torch.set_rng_state(cpu[i])
        if self.device.type == "cuda" and cuda[i] is not None:
            torch.cuda.set_rng_state(cuda[i], self.device)
