"""Run a function on N gloo processes on this machine and collect per-rank results.

Usage::

    def body(rank, world_size, x):            # module-level, picklable
        ...
        return {"grad": tensor}               # anything torch.save can store

    results = run_distributed(body, 2, x)     # list indexed by rank
"""
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, *args, attempts=2):
    """Spawn `world_size` gloo ranks running `fn(rank, world_size, *args)`; return results by rank.

    A failure inside `fn` (a Python exception on some rank) is reported at once with every rank's
    traceback. A failure with no traceback (a rank killed by a signal, or a rendezvous that could not
    bind its port) is infrastructure, not the code under test: it is retried once on a new port.
    """
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                mp.start_processes(_worker, args=(fn, world_size, free_port(), out_dir, args),
                                   nprocs=world_size, start_method="spawn")
            except Exception as e:
                errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                        if f.endswith(".err")]
                if errs or attempt + 1 == attempts:
                    raise RuntimeError(f"distributed test body failed ({type(e).__name__}: {e}):\n"
                                       + "\n".join(errs)) from e
                print(f"run_distributed: no rank raised but the job failed ({e}); retrying once", flush=True)
                continue
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                    for r in range(world_size)]
