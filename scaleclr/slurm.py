"""``config.SLURM.USE_SLURM=True``: train.py submits the run to SLURM through submitit, as VISSL does.

    python train.py config=pretrain/simclr/simclr_8node_resnet config.SLURM.USE_SLURM=True \\
        config.SLURM.PARTITION=learnfair config.SLURM.LOG_FOLDER=/checkpoint/$USER/logs \\
        config.DISTRIBUTED.NUM_NODES=8 config.DISTRIBUTED.NUM_PROC_PER_NODE=8

VISSL's layout and keys (``vissl/utils/distributed_launcher.py``): one task per node, which spawns
``NUM_PROC_PER_NODE`` workers; node id = the task's global rank; rendezvous ``tcp://<first host>:PORT_ID``;
``nodes = NUM_NODES``, ``gpus_per_node = NUM_PROC_PER_NODE`` (none with ``MACHINE.DEVICE=cpu``),
``cpus_per_task = NUM_CPU_PER_PROC x NUM_PROC_PER_NODE``, ``mem_gb = MEM_GB``, ``timeout_min = TIME_HOURS x 60 +
TIME_MINUTES``, ``name/comment/partition/constraint = NAME/COMMENT/PARTITION/CONSTRAINT``, more sbatch options in
``ADDITIONAL_PARAMETERS``. scaleclr adds ``SIGNAL_DELAY_S`` (submitit's ``signal_delay_s``) and
``MAX_NUM_TIMEOUT`` (submitit's ``max_num_timeout``).

Checkpoint and requeue, through submitit's own mechanism. submitit runs :class:`TrainJob` with its handlers
installed: its preemption signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default, sent ``SIGNAL_DELAY_S`` before
the time limit) calls :meth:`TrainJob.checkpoint` and then requeues; SIGTERM is only logged. The workers have
both in their stop signals (``config.TRAINER.STOP_SIGNALS``), so

- at the time limit the task forwards USR2 to its workers; ``checkpoint()`` waits until they have saved
  the agreed step and exited, and returns the ``DelayedSubmission`` that submitit requeues;
- at a preemption (SIGTERM to every process of the step) the workers save and exit 75; the task of global
  rank 0 then raises submitit's signal on itself, which runs the same ``checkpoint()`` + requeue path.

The restart resumes from that checkpoint (AUTO_RESUME). submitit is imported here only.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Dict, List, Optional

import submitit
from omegaconf import OmegaConf

from scaleclr.distributed.stop import EXIT_RESUMABLE

logger = logging.getLogger(__name__)

__all__ = ["TrainJob", "executor_parameters", "submit"]


def _preempt_signal() -> signal.Signals:
    """submitit's preemption / timeout signal (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def executor_parameters(c) -> Dict[str, Any]:
    """``AutoExecutor.update_parameters`` arguments from the ``config`` node (VISSL's mapping)."""
    s, d = c.SLURM, c.DISTRIBUTED
    params: Dict[str, Any] = {
        "name": s.NAME, "slurm_partition": s.PARTITION, "timeout_min": s.TIME_HOURS * 60 + s.TIME_MINUTES,
        "nodes": d.NUM_NODES, "tasks_per_node": 1, "cpus_per_task": s.NUM_CPU_PER_PROC * d.NUM_PROC_PER_NODE,
        "mem_gb": s.MEM_GB, "slurm_signal_delay_s": s.SIGNAL_DELAY_S,
    }
    if c.MACHINE.DEVICE == "gpu":
        params["gpus_per_node"] = d.NUM_PROC_PER_NODE
    if s.COMMENT:
        params["slurm_comment"] = s.COMMENT
    if s.CONSTRAINT:
        params["slurm_constraint"] = s.CONSTRAINT
    extra = OmegaConf.to_container(s.ADDITIONAL_PARAMETERS, resolve=True)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def submit(root, overrides: List[str]):
    """Submit the run described by ``overrides`` (train.py's command line); returns the submitit job."""
    c = root.config
    folder = os.path.abspath(c.SLURM.LOG_FOLDER)
    os.makedirs(folder, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=c.SLURM.MAX_NUM_TIMEOUT)
    executor.update_parameters(**executor_parameters(c))
    job = executor.submit(TrainJob(overrides))
    print(f"submitted SLURM job {job.job_id} ({c.DISTRIBUTED.NUM_NODES} node(s) x {c.DISTRIBUTED.NUM_PROC_PER_NODE} "
          f"workers, partition {c.SLURM.PARTITION}); logs: {folder}/{job.job_id}_0_log.err, checkpoints: "
          f"{c.CHECKPOINT.DIR}", flush=True)
    return job


class TrainJob(submitit.helpers.Checkpointable):
    """What submitit runs on each node: compose the config there, spawn the node's workers, wait.

    Args:
        overrides: train.py's Hydra overrides (``config.SLURM.USE_SLURM=True`` among them).
    """

    def __init__(self, overrides: List[str]):
        self.overrides = list(overrides)
        self._workers = None  # the running torch.multiprocessing ProcessContext (never pickled)
        self._wait_s: Optional[float] = None

    def __getstate__(self):
        return {"overrides": self.overrides}

    def __setstate__(self, state):
        self.__init__(state["overrides"])

    def __call__(self) -> int:
        from scaleclr.config import load_config
        from scaleclr.distributed.launch import spawn
        from scaleclr.main import already_finished, choose_device, setup_logging, start_method_for, worker

        env = submitit.JobEnvironment()
        setup_logging(env.global_rank)
        root, _ = load_config(self.overrides + ["config.SLURM.USE_SLURM=False"])
        c = root.config
        c.DISTRIBUTED.INIT_METHOD, c.DISTRIBUTED.RUN_ID = "tcp", f"{env.hostnames[0]}:{c.SLURM.PORT_ID}"
        root.node_id = env.global_rank
        preempt = _preempt_signal().name
        if preempt not in c.TRAINER.STOP_SIGNALS:
            c.TRAINER.STOP_SIGNALS = list(c.TRAINER.STOP_SIGNALS) + [preempt]
        self._wait_s = float(c.SLURM.SIGNAL_DELAY_S)
        logger.info("submitit job %s, node %d of %d (restart %s): stop signals %s", env.job_id, env.global_rank,
                    env.num_tasks, os.environ.get("SLURM_RESTART_COUNT", "0"), list(c.TRAINER.STOP_SIGNALS))
        if already_finished(root):
            return 0
        device, backend = choose_device(root, None)
        c.MULTI_PROCESSING_METHOD = start_method_for(root, device)
        rc = spawn(worker, root, backend, started=self._started)
        if rc == EXIT_RESUMABLE and env.global_rank == 0 and callable(signal.getsignal(_preempt_signal())):
            # preempted (SIGTERM): the workers saved; submitit's own handler checkpoints and requeues
            signal.raise_signal(_preempt_signal())
        return rc

    def _started(self, context) -> None:
        self._workers = context

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit (in its signal handler, on global rank 0) before it requeues the job: wait until
        this node's workers have written the checkpoint of the agreed step and exited (the signal reached them
        from SLURM and from the spawn parent's forwarder), then hand submitit a fresh job to requeue."""
        if self._workers is not None:
            for p in self._workers.processes:
                p.join(self._wait_s)
            alive = [p.pid for p in self._workers.processes if p.is_alive()]
            if alive:
                logger.warning("workers %s still running after %.0f s; requeueing anyway (the last complete "
                               "checkpoint is resumed)", alive, self._wait_s)
        return submitit.helpers.DelayedSubmission(TrainJob(self.overrides))

