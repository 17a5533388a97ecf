"""Command line of ``train.py``: compose the config, check it, then launch the workers.

    python train.py config=pretrain/simclr/simclr_8node_resnet [config.X.Y=v ...] [+config/group=file]
    python train.py config=quickstart --dry-run          # resolved config as YAML on stdout, logs on stderr
    torchrun --nproc_per_node 4 train.py config=...      # the worker reads its place from the environment
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/zero2.json config=...
    srun python train.py config=...                       # one task per GPU
    srun --ntasks-per-node 1 python train.py config=...   # one task per node: each spawns NUM_PROC_PER_NODE
    python train.py config=benchmark/linear_image_classification/... config.MODEL.WEIGHTS_INIT.PARAMS_FILE=...
                                                          # linear evaluation (scaleclr.tasks), same launchers

Everything that can be checked before a worker starts is checked here: the config (schema, values,
inferred values), the launcher's world against NUM_NODES x NUM_PROC_PER_NODE, optional dependencies the
config asks for (apex), data paths, the rendezvous address.

Exit statuses: 0 trained (or already finished), 1 training failed (NaN/Inf loss, a worker crashed),
2 bad input (a configuration error, CHECKPOINT.DIR owned by another live run, no readable checkpoint to resume
from, ``config.MODEL.MEMORY_CHECK=error`` predicting an out-of-memory), 75 (``EXIT_RESUMABLE``) stopped on one
of ``config.TRAINER.STOP_SIGNALS`` after writing the checkpoint of the step all ranks agreed on: rerun the same
command to resume. A SIGINT that is not a stop signal: 1.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

from scaleclr.config import ConfigError, load_config, to_yaml
from scaleclr.distributed.env import DistEnv, detect_launcher_env
from scaleclr.distributed.sync_bn import is_apex_available as apex_available
from scaleclr.launch import (already_finished, choose_device, run_in_process, setup_logging, spawn,
                             start_method_for, threads_per_worker, worker)
from scaleclr.runlock import RunDirLocked, RunLock

logger = logging.getLogger("scaleclr")

EPILOG = """examples:
  python train.py config=quickstart
  python train.py config=pretrain/simclr/simclr_8node_resnet config.DISTRIBUTED.NUM_NODES=1 \\
      config.DISTRIBUTED.NUM_PROC_PER_NODE=8 config.DATA.TRAIN.DATA_PATHS=[/data/imagenet/train]
  python train.py config=pretrain/simclr/simclr_8node_resnet +config/pretrain/simclr/transforms=multicrop_2x160_4x96
  python train.py config=test/integration_test/quick_simclr_synthetic config.DISTRIBUTED.NUM_PROC_PER_NODE=2
  python train.py config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear \
      config.MODEL.WEIGHTS_INIT.PARAMS_FILE=runs/x/model_final_checkpoint_phase99.torch   # linear evaluation
  torchrun --nproc_per_node 2 train.py config=test/integration_test/quick_simclr_synthetic \\
      config.DISTRIBUTED.NUM_PROC_PER_NODE=2
"""


def parse_args(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(prog="train.py", description="scaleclr: SimCLR pretraining and linear evaluation "
                                "with VISSL configs. Positional arguments are Hydra overrides (config=..., "
                                "config.X.Y=v, +config/group=option).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed / torch.distributed.launch launchers")
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON; selects the deepspeed engine")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    args, overrides = p.parse_known_args(argv)
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        p.error(f"unrecognized arguments: {' '.join(flags)} (Hydra overrides have no leading dashes)")
    if args.deepspeed_config:
        overrides += ["config.DISTRIBUTED.ENGINE=deepspeed",
                      f"config.DISTRIBUTED.DEEPSPEED_CONFIG={args.deepspeed_config}"]
    return args, overrides


def is_agent(root, env: Optional[DistEnv]) -> bool:
    """One task per node under SLURM with NUM_PROC_PER_NODE > 1: this task spawns its node's workers."""
    return env is not None and env.launcher == "slurm" and env.local_world_size == 1 and \
        root.config.DISTRIBUTED.NUM_PROC_PER_NODE > 1


def preflight(root, env: Optional[DistEnv]) -> None:
    """Checks that need the machine, run before any worker starts. Raises ConfigError."""
    c = root.config
    d = c.DISTRIBUTED
    config_world = d.NUM_NODES * d.NUM_PROC_PER_NODE
    if is_agent(root, env):
        if env.world_size != d.NUM_NODES:
            raise ConfigError("config.DISTRIBUTED.NUM_NODES", f"= {d.NUM_NODES} but SLURM started one task on each of "
                              f"{env.world_size} nodes; make them agree (slurm/train.sbatch passes "
                              "NUM_NODES=$SLURM_JOB_NUM_NODES).")
    elif env is not None and env.world_size != config_world:
        layout = (" With one task per node, SLURM needs config.DISTRIBUTED.NUM_PROC_PER_NODE > 1 (each task spawns "
                  "that many workers); with one task per GPU, srun --ntasks-per-node=<GPUs per node>."
                  if env.launcher == "slurm" else "")
        raise ConfigError("config.DISTRIBUTED", f"the {env.launcher} launcher started {env.world_size} processes "
                          f"but config.DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE = {d.NUM_NODES} x "
                          f"{d.NUM_PROC_PER_NODE} = {config_world}; make them agree.{layout}")
    sbn = c.MODEL.SYNC_BN_CONFIG
    if sbn.CONVERT_BN_TO_SYNC_BN and sbn.SYNC_BN_TYPE == "apex" and config_world > 1 and not apex_available():
        raise ConfigError("config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE", "= apex but apex is not installed (it is "
                          "not on PyPI; build it from NVIDIA/apex). Use SYNC_BN_TYPE=pytorch (torch's SyncBN on "
                          "CUDA, scaleclr's on CPU) or native (scaleclr's everywhere).")
    if c.MACHINE.DEVICE == "gpu" and torch.cuda.is_available() and (env is None or is_agent(root, env)) and \
            d.NUM_PROC_PER_NODE > torch.cuda.device_count():
        raise ConfigError("config.DISTRIBUTED.NUM_PROC_PER_NODE", f"= {d.NUM_PROC_PER_NODE} but this node has "
                          f"{torch.cuda.device_count()} GPUs.")
    if d.ENGINE == "deepspeed":
        from scaleclr.config.deepspeed_json import check_deepspeed_config
        check_deepspeed_config(root)
    from scaleclr.preflight import check_inputs
    check_inputs(root, config_world)  # data (demo cache prepared once, here; a folder probed, not listed), run dir


def submit_to_slurm(root, overrides: List[str], env: Optional[DistEnv]) -> int:
    """``config.SLURM.USE_SLURM=True``: submit the run through submitit (``scaleclr.slurm``) and return."""
    if env is not None:
        raise ConfigError("config.SLURM.USE_SLURM", f"= True submits a job, but this process was started by "
                          f"{env.launcher}; run train.py with USE_SLURM=True from a login node (no srun/torchrun).")
    from scaleclr.slurm import submit

    submit(root, overrides)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args, overrides = parse_args(argv)
    env = detect_launcher_env(os.environ, args.local_rank)
    setup_logging(env.rank if env else 0)
    try:
        root, info = load_config(overrides)  # NUM_NODES x NUM_PROC_PER_NODE; preflight checks it against env
        if args.dry_run:
            logger.info("inferred: %s", info)
            sys.stdout.write(to_yaml(root))
            return 0
        logger.info("inferred: %s", info)
        if root.config.SLURM.USE_SLURM:
            return submit_to_slurm(root, overrides, env)
        # one launcher process decides; workers agree via rank 0 (TEST_ONLY trains nothing: it always runs)
        if env is None and not root.config.TEST_ONLY and already_finished(root):
            return 0
        try:
            preflight(root, env)  # (CHECKPOINT.DIR usable: checked before its lock is read)
        except ValueError as e:  # data / engine set-up errors name their key already
            raise e if isinstance(e, ConfigError) else ConfigError("", str(e)) from e
        if env is None:  # no worker started yet: refuse a directory another run owns at once (rank 0 locks it)
            RunLock(root.config.CHECKPOINT.DIR, stale_s=60 * root.config.CHECKPOINT.LOCK_STALE_MINUTES).check()
        device, backend = choose_device(root, env)
        root.config.MULTI_PROCESSING_METHOD = start_method_for(root, device)
        if is_agent(root, env):
            return spawn(worker, root, backend, agent=env)
        if env is not None:
            torch.set_num_threads(threads_per_worker(env.local_world_size))
            return run_in_process(worker, root, env, backend, None)
        d = root.config.DISTRIBUTED
        if d.NUM_NODES * d.NUM_PROC_PER_NODE == 1:
            single = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                             master_addr="127.0.0.1", master_port=29500, launcher="none")
            return run_in_process(worker, root, single, backend, None)
        return spawn(worker, root, backend)  # RUN_ID / INIT_METHOD are checked there before any worker starts
    except ConfigError as e:
        logger.error("configuration error: %s", e)
        return 2
    except RunDirLocked as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:  # SIGINT that is not one of the stop signals: no checkpoint, a failure (status 1)
        logger.error("interrupted (SIGINT is not in config.TRAINER.STOP_SIGNALS): no checkpoint was written")
        return 1
