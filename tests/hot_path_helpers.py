"""Counting the collectives and host reads of a region (tests/test_hot_path.py's training step, test_linear_eval.py's
linear-evaluation step): on a GPU every host read stalls the host until the queued work finishes, so the count
guards the CUDA hot path on a CPU."""
import contextlib

import torch

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
               "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter", "barrier", "all_gather_object",
               "broadcast_object_list", "reduce", "all_reduce_coalesced", "all_gather_coalesced")
SYNCS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting():
    """Counts calls of the collectives and of the host-reading tensor methods while active.

    Inside ``StopSignal.agree`` (the step-boundary stop agreement: an int on the CPU over a gloo group, by design
    never a device tensor) calls are counted under ``control.*`` instead."""
    import torch.distributed as dist

    from scaleclr.distributed.stop import StopSignal

    counts = {}
    saved = []
    inside_control = [False]

    def wrap(owner, name, label):
        fn = getattr(owner, name, None)
        if fn is None:
            return
        saved.append((owner, name, fn))

        def counted(*a, **k):
            key = "control." + label if inside_control[0] else label
            counts[key] = counts.get(key, 0) + 1
            return fn(*a, **k)

        setattr(owner, name, counted)

    for name in COLLECTIVES:
        wrap(dist, name, f"dist.{name}")
    for name in SYNCS:
        wrap(torch.Tensor, name, f"Tensor.{name}")
    agree = StopSignal.agree
    saved.append((StopSignal, "agree", agree))

    def control_agree(self, step):
        inside_control[0] = True
        try:
            return agree(self, step)
        finally:
            inside_control[0] = False

    StopSignal.agree = control_agree
    try:
        yield counts
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
