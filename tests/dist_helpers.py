"""Run a function on N gloo processes on this machine and collect per-rank results.

Usage::

    def body(rank, world_size, x):            # module-level, picklable
        ...
        return {"grad": tensor}               # anything torch.save can store

    results = run_distributed(body, 2, x)     # list indexed by rank

The ranks rendezvous through a file in a fresh temporary directory (``file://``), not a TCP port: a port
chosen by one process and bound later by another can be taken in between by any other program (the cause of
the rare setup failures this helper once retried), a private file cannot. There is no retry: a failure is
reported at once, with every rank's traceback and exit code.

The ranks are forked from the pytest process (``SCALECLR_TEST_START_METHOD=spawn`` to start fresh
interpreters instead): each inherits the imported torch / scaleclr / deepspeed modules instead of importing
them again (~5 s of CPU per rank on 2 cores), and sets one intra-op thread before any work. Test bodies are
module-level functions and build everything they use, as under spawn.
"""
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A currently free TCP port, for tests of launchers that need one (torchrun, deepspeed, tcp RUN_ID)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, rendezvous, out_dir, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, *args):
    """Spawn `world_size` gloo ranks running `fn(rank, world_size, *args)`; return results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        rendezvous = os.path.join(out_dir, "rendezvous")
        try:
            mp.start_processes(_worker, args=(fn, world_size, rendezvous, out_dir, args), nprocs=world_size,
                               start_method=os.environ.get("SCALECLR_TEST_START_METHOD", "fork"))
        except Exception as e:
            errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
            raise RuntimeError(f"distributed test body failed ({type(e).__name__}: {e}):\n" + "\n".join(errs)) from e
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
