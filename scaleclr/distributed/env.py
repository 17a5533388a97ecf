"""Rank/world discovery from launchers (torchrun, deepspeed, SLURM srun), process-group init and a barrier.

``detect_launcher_env`` reads what an external launcher put in the environment and returns a :class:`DistEnv`, or
None when no launcher is present (then scaleclr spawns ``DISTRIBUTED.NUM_PROC_PER_NODE`` workers itself, or runs
a single process). Detection order and rules:

1. **torchrun** (``TORCHELASTIC_RUN_ID`` set): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (node),
   MASTER_ADDR/MASTER_PORT.
2. **deepspeed** launcher (``--local_rank`` passed on the command line, given as ``local_rank_arg``, or its
   CROSS_RANK/CROSS_SIZE/LOCAL_SIZE variables set): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK,
   MASTER_ADDR/MASTER_PORT.
3. Any other launcher that follows the ``env://`` convention (RANK and WORLD_SIZE set, e.g. a cluster operator):
   reported as ``torchrun``-style; LOCAL_RANK defaults to 0 and LOCAL_WORLD_SIZE to WORLD_SIZE (one node).
4. **SLURM**, only inside an ``srun`` step: ``SLURM_PROCID`` and a real ``SLURM_STEP_ID`` set. Rank =
   SLURM_PROCID, world = the step's task count (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS), local rank =
   SLURM_LOCALID, node = SLURM_STEP_NODEID (else SLURM_NODEID), local world = this node's entry of
   SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE (``"4(x2),3"``) or SLURM_NTASKS_PER_NODE; master =
   MASTER_ADDR if set, else the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST (``scontrol show
   hostnames``, Slurm's own hostlist expansion); port = MASTER_PORT if
   set, else ``20000 + SLURM_JOB_ID % 20000``.
   Why the step rule: an ``sbatch`` batch script is itself "task 0" (SLURM_PROCID=0) and sees the job's
   SLURM_NTASKS (e.g. 8) but no SLURM_STEP_ID, so ``python train.py`` run directly from the script must not
   believe it is rank 0 of 8 (it would wait for 7 ranks that never come); it spawns NUM_PROC_PER_NODE workers
   as configured. Two layouts of an srun step:

   - one task per GPU (``srun --ntasks-per-node=<GPUs>``): every task is a worker;
   - one task per node (``srun --ntasks-per-node=1``, VISSL/submitit style; ``local_world_size == 1``): with
     NUM_PROC_PER_NODE > 1 each task is an agent that spawns its node's workers (global rank = node x
     NUM_PROC_PER_NODE + local rank, rendezvous at the master and port above; see
     :meth:`DistEnv.for_spawned_worker` and ``scaleclr.launch.spawn``). A one-task step
     (``srun -N1 -n1``) is this layout on one node.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import shutil
import subprocess
from typing import Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "DistEnv",
    "LAUNCHERS",
    "detect_launcher_env",
    "parse_tasks_per_node",
    "init_process_group",
    "barrier",
]

LAUNCHERS = ("none", "spawn", "torchrun", "deepspeed", "slurm")
_SLURM_SPECIAL_STEP_IDS = 0xFFFFFFF0  # batch, extern, interactive and pending steps have ids >= this
_DEFAULT_PORT = 29500


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank in [0, world_size).
        local_rank: rank on this node in [0, local_world_size) (the CUDA device index with NCCL).
        world_size: number of training processes.
        local_world_size: training processes on this node.
        node_rank: index of this node.
        master_addr: rendezvous host (rank 0's node).
        master_port: rendezvous port.
        launcher: one of ``"none"``, ``"spawn"``, ``"torchrun"``, ``"deepspeed"``, ``"slurm"``.
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid rank {self.rank} for world size {self.world_size} ({self.launcher})")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"invalid local rank {self.local_rank} for local world size {self.local_world_size} "
                             f"({self.launcher})")
        if self.node_rank < 0 or not 0 < self.master_port < 65536:
            raise ValueError(f"invalid node rank {self.node_rank} or master port {self.master_port} "
                             f"({self.launcher})")

    @property
    def num_nodes(self) -> int:
        """Number of nodes, assuming the same number of processes on every node."""
        return max(1, self.world_size // self.local_world_size)

    def for_spawned_worker(self, local_rank: int, num_proc_per_node: int) -> "DistEnv":
        """Env of worker ``local_rank`` of ``num_proc_per_node`` spawned on this node by a one-per-node agent.

        For a launcher that started one process per node (``srun --ntasks-per-node=1``, VISSL/submitit style, or
        ``train.py``'s own launcher, node ``node_id``), which then spawns ``num_proc_per_node`` workers: global
        rank = node_rank * num_proc_per_node + local_rank, world = world_size * num_proc_per_node.
        """
        if self.local_world_size != 1:
            raise ValueError(f"{self.launcher} already started {self.local_world_size} processes on this node; "
                             "spawning more per process is not supported (use one task per node, or one task "
                             "per GPU without spawning)")
        if not 0 <= local_rank < num_proc_per_node:
            raise ValueError(f"local_rank {local_rank} outside [0, {num_proc_per_node})")
        return DistEnv(rank=self.node_rank * num_proc_per_node + local_rank, local_rank=local_rank,
                       world_size=self.world_size * num_proc_per_node, local_world_size=num_proc_per_node,
                       node_rank=self.node_rank, master_addr=self.master_addr, master_port=self.master_port,
                       launcher="spawn")


# --------------------------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------------------------

def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {key} is required here but not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _first_host(key: str, hostlist: str) -> str:
    """First host of the Slurm hostlist in environment variable ``key``: a single name is itself, anything else
    (``node[01-03,07],gpu5``) goes to ``scontrol show hostnames``, with a timeout (Slurm clients retry for up to
    60 s when no slurm.conf is reachable).

    Raises:
        ValueError: scontrol is missing, fails, times out or prints nothing (the message names ``key`` and
            MASTER_ADDR, which skips this lookup).
    """
    hostlist = hostlist.strip()
    if not re.search(r"[\[\],\s]", hostlist):
        return hostlist
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise ValueError(f"{key}={hostlist!r}: finding its first host needs `scontrol show hostnames`, and scontrol "
                         "is not on PATH; export MASTER_ADDR (the rank-0 host) instead")
    try:
        out = subprocess.run([scontrol, "show", "hostnames", hostlist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
    except subprocess.CalledProcessError as e:
        raise ValueError(f"{key}={hostlist!r}: `scontrol show hostnames` failed (exit status {e.returncode}: "
                         f"{(e.stderr or '').strip()}); export MASTER_ADDR instead") from e
    except (subprocess.SubprocessError, OSError) as e:
        raise ValueError(f"{key}={hostlist!r}: `scontrol show hostnames` failed ({e}); export MASTER_ADDR "
                         "instead") from e
    if not out:
        raise ValueError(f"{key}={hostlist!r}: `scontrol show hostnames` printed no host; export MASTER_ADDR "
                         "instead")
    return out[0]


def parse_tasks_per_node(text: str) -> list[int]:
    """Slurm tasks-per-node list: ``"4(x2),3"`` -> [4, 4, 3]; ``"2,2"`` -> [2, 2]; ``"8"`` -> [8]."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"cannot parse Slurm tasks-per-node value {text!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# --------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------

def _env_style(environ: Mapping[str, str], launcher: str, local_rank_arg: int | None) -> DistEnv:
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    if "LOCAL_RANK" in environ:
        local_rank = _int(environ, "LOCAL_RANK")
        if local_rank_arg is not None and local_rank_arg != local_rank:
            raise ValueError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={local_rank}")
    else:
        local_rank = local_rank_arg if local_rank_arg is not None else 0
    local_world = _int(environ, "LOCAL_WORLD_SIZE", _int(environ, "LOCAL_SIZE", world))
    node_rank = _int(environ, "GROUP_RANK", _int(environ, "CROSS_RANK", rank // local_world))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                   node_rank=node_rank, master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
                   master_port=_int(environ, "MASTER_PORT", _DEFAULT_PORT), launcher=launcher)


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    if not environ.get("SLURM_PROCID"):
        return False
    step = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")
    return bool(step) and step.isdigit() and int(step) < _SLURM_SPECIAL_STEP_IDS


def _slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_NTASKS", _int(environ, "SLURM_NPROCS", 1)))
    local_rank = _int(environ, "SLURM_LOCALID", 0)
    node_rank = _int(environ, "SLURM_STEP_NODEID", _int(environ, "SLURM_NODEID", 0))
    tpn = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if tpn:
        per_node = parse_tasks_per_node(tpn)
        if node_rank >= len(per_node):
            raise ValueError(f"SLURM node id {node_rank} outside the tasks-per-node list {tpn!r}")
        local_world = per_node[node_rank]
    elif environ.get("SLURM_NTASKS_PER_NODE"):
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    else:
        local_world = world
    master = environ.get("MASTER_ADDR")
    if not master:
        key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(k)),
                   None)
        master = _first_host(key, environ[key]) if key else "127.0.0.1"
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT")
    else:
        job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
        port = 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else _DEFAULT_PORT
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                   node_rank=node_rank, master_addr=master, master_port=port, launcher="slurm")


def detect_launcher_env(environ: Mapping[str, str] = os.environ, local_rank_arg: int | None = None
                        ) -> DistEnv | None:
    """Rank/world from an external launcher's environment, or None when no launcher is present.

    Args:
        environ: the environment to read (``os.environ`` by default; tests pass dicts).
        local_rank_arg: value of a ``--local_rank`` command-line flag (appended by the deepspeed launcher).

    Returns:
        A :class:`DistEnv` with ``launcher`` in {"torchrun", "deepspeed", "slurm"}, or None. The rules are in the
        module docstring (notably: SLURM only inside an ``srun`` step).

    Raises:
        ValueError: a launcher is present but its variables are malformed or inconsistent.
    """
    if environ.get("TORCHELASTIC_RUN_ID") and "RANK" in environ:
        return _env_style(environ, "torchrun", local_rank_arg)
    deepspeed_vars = any(k in environ for k in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"))
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = "deepspeed" if (local_rank_arg is not None or deepspeed_vars) else "torchrun"
        return _env_style(environ, launcher, local_rank_arg)
    if _in_srun_step(environ):
        return _slurm(environ)
    return None


# --------------------------------------------------------------------------------------------------------------
# Process group and helpers
# --------------------------------------------------------------------------------------------------------------

def init_process_group(env: DistEnv, backend: str, init_method: str | None = None, timeout_s: float = 1800.0
                       ) -> None:
    """Initialise torch.distributed for ``env`` with an explicit timeout.

    With ``backend="nccl"`` the CUDA device is set to ``env.local_rank`` first (and passed as ``device_id``).
    ``init_method=None`` rendezvouses at ``tcp://master_addr:master_port`` from ``env`` (so SLURM-derived
    addresses work without MASTER_* in the environment); ``"env://"`` fills MASTER_ADDR/MASTER_PORT from ``env``
    when unset.

    Raises:
        ValueError: a bad timeout, or a process group that is already initialised with a different rank/world.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if dist.is_initialized():
        if dist.get_rank() != env.rank or dist.get_world_size() != env.world_size:
            raise ValueError(f"torch.distributed is already initialised as rank {dist.get_rank()}/"
                             f"{dist.get_world_size()}, not {env.rank}/{env.world_size}")
        return
    device_id = None
    if backend == "nccl":
        # srun may bind one GPU per task: local rank 3 then sees a single device 0
        device_id = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    if init_method is None:
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        init_method = f"tcp://{host}:{env.master_port}"
    elif init_method == "env://":
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
    logger.info("init_process_group: backend=%s rank=%d/%d local_rank=%d launcher=%s init=%s timeout=%ss",
                backend, env.rank, env.world_size, env.local_rank, env.launcher, init_method, timeout_s)
    dist.init_process_group(backend=backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)


def barrier() -> None:
    """``dist.barrier()`` when distributed with more than one rank; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
