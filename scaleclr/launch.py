"""Start the training workers: in this process, spawned locally (VISSL's launcher), or under torchrun /
the deepspeed launcher / srun (the worker reads its place from the environment and never spawns).

Rank layout of a spawned node: global rank = node_id x NUM_PROC_PER_NODE + local_rank. Rendezvous from
``DISTRIBUTED.INIT_METHOD`` and ``RUN_ID`` as in VISSL: ``tcp`` + ``host:port`` (``auto``: one node only, a
rendezvous file in a fresh temporary directory, so no port can be taken between choosing and binding it),
``env`` (MASTER_ADDR / MASTER_PORT), ``file`` (a shared file path). If any worker fails, the others are
terminated and the launcher exits non-zero; collectives carry ``DISTRIBUTED.TIMEOUT_SECONDS`` so a rank that
dies under another launcher cannot hang the rest forever.

One task per node (VISSL's SLURM layout, ``srun --ntasks-per-node=1`` over several nodes): each task is an
agent that spawns its node's NUM_PROC_PER_NODE workers (:func:`spawn` with ``agent``), global rank =
node x NUM_PROC_PER_NODE + local rank, rendezvous at the address SLURM's node list gives.

Stop signals (``config.TRAINER.STOP_SIGNALS``, :mod:`scaleclr.distributed.stop`): every worker installs the
stop handler before anything else; a spawning parent blocks the signals while it starts the workers (they
inherit the mask, so a signal during their start-up waits instead of killing them), then forwards each stop
signal to every live worker. A worker that stopped on a signal exits with ``EXIT_RESUMABLE`` (75) and the
parent returns that status.

The parent also forwards SIGINT, SIGTERM and SIGUSR1 when they are not stop signals (an interrupt sent to the
launcher alone: ``kill -INT <pid>``, ``timeout -s INT``, a notebook's stop button) and never acts on them
itself: it keeps waiting for its workers, which stop (a stop signal: checkpoint, 75) or die of it (SIGINT
raises KeyboardInterrupt in the worker, SIGTERM/SIGUSR1 kill it: 1). Whatever ends the wait, no worker is
left running (:func:`_reap`). The parent's status is one of the documented ones (:func:`exit_status`): 0 done,
1 a worker failed or was killed, 2 bad input (a worker that found the run directory locked, an unreadable
checkpoint), 75 stopped and checkpointed.

What runs in a worker process (:func:`worker`: logging, its device, the CUDA math settings, the Trainer) lives here
too, so both entry points, ``train.py`` (:mod:`scaleclr.main`) and the submitit job (:mod:`scaleclr.slurm`), import
this module and neither imports the other.
"""
import logging
import os
import signal
import socket
import sys
import tempfile
from multiprocessing import resource_tracker
from typing import Callable, List, Optional, Sequence

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from scaleclr.checkpoint import CheckpointManager
from scaleclr.config import ConfigError
from scaleclr.distributed.env import DistEnv, init_process_group
from scaleclr.distributed.stop import EXIT_RESUMABLE, SignalForwarder, StopSignal, parse_signals
from scaleclr.runlock import RunDirLocked

logger = logging.getLogger(__name__)

Worker = Callable[[object, DistEnv, str, StopSignal], int]


#: signals a spawning parent forwards to its workers even when they are not stop signals
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def exit_status(worker_code: Optional[int]) -> int:
    """The launcher's status for a worker that ended with ``worker_code`` (negative: killed by a signal):
    0, 2 and ``EXIT_RESUMABLE`` pass through, anything else is a failure (1)."""
    return worker_code if worker_code in (0, 2, EXIT_RESUMABLE) else 1


def stop_signals(root) -> List[signal.Signals]:
    """The signals that make a worker checkpoint and stop (``config.TRAINER.STOP_SIGNALS``)."""
    return parse_signals(root.config.TRAINER.STOP_SIGNALS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_method_for(dcfg, num_nodes: int) -> Optional[str]:
    """The init_process_group URL for a spawned node, from INIT_METHOD and RUN_ID."""
    method, run_id = dcfg.INIT_METHOD, str(dcfg.RUN_ID)
    if method == "tcp":
        if run_id == "auto":
            if num_nodes > 1:
                raise ConfigError("config.DISTRIBUTED.RUN_ID", "is 'auto', which only works on one node; for "
                                  f"{num_nodes} nodes set it to <master_host>:<port> (the same on every node).")
            return f"file://{os.path.join(tempfile.mkdtemp(prefix='scaleclr_rdzv_'), 'rendezvous')}"
        host, _, port = run_id.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("config.DISTRIBUTED.RUN_ID", f"= {run_id!r} is not <host>:<port> (e.g. "
                              "10.0.0.1:29500), which INIT_METHOD=tcp needs.")
        return f"tcp://{run_id}"
    if method == "file":
        if run_id in ("", "auto"):
            if num_nodes > 1:
                raise ConfigError("config.DISTRIBUTED.RUN_ID", "INIT_METHOD=file on several nodes needs a path "
                                  "on a shared file system.")
            run_id = os.path.join(tempfile.mkdtemp(prefix="scaleclr_rdzv_"), "rendezvous")
        return f"file://{os.path.abspath(run_id)}"
    if num_nodes > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise ConfigError("config.DISTRIBUTED.INIT_METHOD", "= env on several nodes needs MASTER_ADDR and "
                          "MASTER_PORT in the environment of every node (the address of node 0).")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return "env://"


def threads_per_worker(local_world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // local_world_size)


def run_in_process(worker: Worker, root, env: DistEnv, backend: str, init_method: Optional[str],
                   stop: Optional[StopSignal] = None) -> int:
    """Run one worker here (world of 1, or a launcher-started process). The stop handler is installed first,
    so a signal during the rendezvous is not fatal either."""
    stop = stop or StopSignal(stop_signals(root)).install()
    if root.config.DISTRIBUTED.NCCL_DEBUG:
        os.environ.setdefault("NCCL_DEBUG", "INFO")  # VISSL's DISTRIBUTED.NCCL_DEBUG
    if env.world_size > 1:
        init_process_group(env, backend, init_method, root.config.DISTRIBUTED.TIMEOUT_SECONDS)
    try:
        return worker(root, env, backend, stop)
    finally:
        stop.ignore_from_now()  # the checkpoint is recorded: a late signal must not kill the teardown
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _spawn_entry(local_rank: int, worker: Worker, yaml_cfg: str, node: DistEnv, nproc: int, backend: str,
                 init_method: Optional[str], signals: Sequence[int], forwarded: Sequence[int] = ()) -> None:
    for s in {*signals, *forwarded}:  # a forked worker inherits the launcher's handlers (its forwarder,
        # submitit's): not its own (still blocked here, so nothing arrives before the stop handler)
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT and s not in signals else signal.SIG_DFL)
    stop = StopSignal(signals).install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*signals, *forwarded})  # blocked by the parent until now
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(threads_per_worker(nproc))
    root = OmegaConf.create(yaml_cfg)
    env = node.for_spawned_worker(local_rank, nproc)
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(env.world_size))
    try:
        rc = run_in_process(worker, root, env, backend, init_method, stop)
    except BaseException:
        # every failing rank says so (the launcher re-raises only the first failure it notices, which may be a
        # rank that merely lost its peer)
        logger.exception("worker rank %d failed", env.rank)
        raise
    if rc:
        sys.exit(rc)


def spawn(worker: Worker, root, backend: str, agent: Optional[DistEnv] = None,
          started: Optional[Callable[[object], None]] = None) -> int:
    """Start NUM_PROC_PER_NODE workers on this node and wait for them.

    Args:
        agent: ``None``: this node is ``node_id`` of the config, rendezvous from INIT_METHOD / RUN_ID (VISSL).
            Else the env of a one-task-per-node launcher (SLURM): its node rank and master address are used.
        started: called with the workers' ``ProcessContext`` once they run (submitit's checkpoint waits on it).
    """
    d = root.config.DISTRIBUTED
    nproc = d.NUM_PROC_PER_NODE
    if agent is None:
        init_method = init_method_for(d, d.NUM_NODES)
        node = DistEnv(rank=root.node_id, local_rank=0, world_size=d.NUM_NODES, local_world_size=1,
                       node_rank=root.node_id, master_addr="127.0.0.1", master_port=29500, launcher="spawn")
    else:
        init_method, node = None, agent  # tcp://<master from the node list>:<port from the job id>
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logger.info("spawning %d workers (node %d of %d, world %d, backend %s, %s)", nproc, node.node_rank,
                node.world_size, node.world_size * nproc, backend,
                init_method or f"tcp://{node.master_addr}:{node.master_port}")
    yaml_cfg = OmegaConf.to_yaml(root, resolve=True)
    method = root.config.MULTI_PROCESSING_METHOD
    signals = stop_signals(root)
    forwarded = sorted({*signals, *FORWARDED})
    forwarder = context = None
    try:
        context, forwarder = _start_forwarding(lambda: mp.start_processes(
            _spawn_entry, args=(worker, yaml_cfg, node, nproc, backend, init_method, signals, forwarded),
            nprocs=nproc, join=False, start_method=method), forwarded)
        if started is not None:
            started(context)
        while not context.join():
            pass
    except mp.ProcessRaisedException as e:
        logger.error("a worker failed; all workers were stopped:\n%s", e)
        return 1
    except mp.ProcessExitedException as e:
        if e.exit_code == EXIT_RESUMABLE:
            logger.info("the workers stopped on a signal after writing a checkpoint (exit status %d: rerun to "
                        "resume)", EXIT_RESUMABLE)
        else:
            logger.error("a worker %s; all workers were stopped", f"was killed by {e.signal_name}" if
                         getattr(e, "signal_name", None) else f"exited with code {e.exit_code}")
        return exit_status(e.exit_code)
    finally:
        if context is not None:
            _reap(context)
        if forwarder is not None:
            forwarder.restore()
    return 0


def _reap(context, grace_s: float = 30.0) -> None:
    """Leave no worker running: SIGTERM the live ones (their stop handler checkpoints), SIGKILL after
    ``grace_s``. A no-op after a normal join."""
    alive = [p for p in context.processes if p.is_alive()]
    if not alive:
        return
    logger.error("the launcher stops %d worker(s) that are still running", len(alive))
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join()


def _start_forwarding(start: Callable[[], "mp.ProcessContext"], signals: Sequence[int]):
    """``start()`` the workers with ``signals`` blocked, then forward those signals to them.

    The children inherit the mask and unblock it once their stop handler is installed, so a signal during
    their start-up waits instead of killing them; a signal the parent got meanwhile is forwarded when the
    parent's mask is restored. Returns ``(context, forwarder)``.
    """
    resource_tracker.ensure_running()  # CPython's tracker unblocks SIGTERM when it starts: start it first
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        context = start()
        forwarder = SignalForwarder(signals, lambda: [p.pid for p in context.processes if p.is_alive()]).install()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return context, forwarder


# ------------------------------------------------------------------------- what runs in a worker process
def setup_logging(rank: int = 0, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def choose_device(root, env: Optional[DistEnv]) -> tuple:
    """(device, backend) for this process; `gpu` falls back to CPU + gloo when CUDA is absent."""
    c = root.config
    local_rank = env.local_rank if env else 0
    if c.MACHINE.DEVICE == "gpu" and torch.cuda.is_available():
        backend = c.DISTRIBUTED.BACKEND
        return torch.device("cuda", local_rank % torch.cuda.device_count()), backend
    if c.MACHINE.DEVICE == "gpu" and (env is None or env.rank == 0):
        logger.warning("config.MACHINE.DEVICE=gpu but CUDA is not available: running on CPU with gloo")
    return torch.device("cpu"), "gloo"


def bind_device(device: torch.device) -> None:
    """Make ``device`` this process's current CUDA device, whatever the backend (``init_process_group`` does it
    for NCCL only; under gloo every rank would otherwise create its context, streams and Triton launches on
    cuda:0). A no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def set_cuda_math(model_cfg, device: torch.device) -> None:
    """``config.MODEL.CUDNN_BENCHMARK`` and ``FLOAT32_MATMUL_PRECISION`` on CUDA (set before the model is built).
    A no-op on CPU, where ``set_float32_matmul_precision`` would change oneDNN's fp32 matmuls too."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = bool(model_cfg.CUDNN_BENCHMARK)
    torch.set_float32_matmul_precision(str(model_cfg.FLOAT32_MATMUL_PRECISION))


def start_method_for(root, device: torch.device) -> str:
    """``config.MULTI_PROCESSING_METHOD`` for spawning workers from this process. ``fork`` becomes ``forkserver``
    when the workers use CUDA: this process has called ``torch.cuda.is_available()``, which marks every forked
    child "bad fork", so the child's first CUDA call fails ("Cannot re-initialize CUDA in forked subprocess")."""
    method = root.config.MULTI_PROCESSING_METHOD
    if method == "fork" and device.type == "cuda":
        logger.warning("config.MULTI_PROCESSING_METHOD=fork cannot start CUDA workers (CUDA is initialised in "
                       "this launcher); using forkserver")
        return "forkserver"
    return method


def already_finished(root) -> bool:
    """Whether the run in CHECKPOINT.DIR has finished all its epochs (then nothing is started)."""
    ck = root.config.CHECKPOINT
    final = CheckpointManager(ck.DIR).final()
    if not (final and ck.AUTO_RESUME and not ck.OVERWRITE_EXISTING):
        return False
    if final["epochs_done"] < root.config.OPTIMIZER.num_epochs:
        return False
    logger.info("training already finished in %s (%s); set config.CHECKPOINT.OVERWRITE_EXISTING=True or another "
                "config.CHECKPOINT.DIR to train again", ck.DIR, final["path"])
    return True


def memory_precheck(root, device: torch.device) -> bool:
    """``config.MODEL.MEMORY_CHECK`` on CUDA, before the model is built (:func:`scaleclr.planner.rows.memory_check`):
    False when the run is predicted not to fit and the mode is ``error`` (the message names what fits)."""
    from scaleclr.planner.rows import MemoryCheckError, memory_check
    try:
        memory_check(root, device)
    except MemoryCheckError as e:
        logger.error("%s", e)
        return False
    return True


def worker(root, env: DistEnv, backend: str, stop: StopSignal) -> int:
    """One training process: 0 when done, ``EXIT_RESUMABLE`` when it stopped on a signal (checkpoint
    written), 1 on a non-finite loss, 2 when another run owns CHECKPOINT.DIR, no recorded checkpoint can be
    read (``config.CHECKPOINT.ON_CORRUPT``) or ``config.MODEL.MEMORY_CHECK=error`` predicts an out-of-memory."""
    from scaleclr.checkpoint import CheckpointUnreadable
    from scaleclr.trainer import NonFiniteLossError, Trainer

    setup_logging(env.rank, root.config.VERBOSE)
    device, _ = choose_device(root, env)
    bind_device(device)
    set_cuda_math(root.config.MODEL, device)
    if not memory_precheck(root, device):
        return 2
    try:
        results = Trainer(root, rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                          local_world_size=env.local_world_size, device=device, stop=stop).train()
    except NonFiniteLossError as e:
        logger.error("%s", e)
        return 1
    except (RunDirLocked, CheckpointUnreadable) as e:
        logger.error("%s", e)
        return 2
    return EXIT_RESUMABLE if "stopped_by" in results else 0
