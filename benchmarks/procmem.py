"""Peak-memory helpers shared by the CPU benchmarks (Linux /proc)."""
import re


def status_kb(key: str) -> int:
    """A /proc/self/status field in KiB, e.g. VmRSS (now) or VmHWM (peak since start or last reset)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> bool:
    """Restart VmHWM at the current RSS (clear_refs = 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False



def tensor_peak():
    """A dispatch mode whose ``peak`` is the largest total of live tensor storages while it is active: those
    alive on entry (found with ``gc``) and every storage an operator creates inside, at their current sizes
    after every operator (FSDP2 frees a gathered unit by resizing its storage to 0, not by dropping it) -- the
    CPU counterpart of ``torch.cuda.max_memory_allocated`` (no allocator rounding, no Python or library memory).
    Use as ``with tensor_peak() as m: step()``; ``m.peak`` in bytes."""
    import gc

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class TensorPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = WeakIdKeyDictionary()
            self.peak = 0

        def total(self) -> int:
            """Bytes of the live storages, each allocation once (two storage objects can share one)."""
            return sum({st.data_ptr(): st.nbytes() for st in self.storages.keys() if st.nbytes()}.values())

        def __enter__(self):
            gc.collect()
            for o in gc.get_objects():
                if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type == "cpu":
                    self.storages[o.untyped_storage()] = None
            self.peak = self.total()
            return super().__enter__()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if type(t) in (torch.Tensor, torch.nn.Parameter):  # a DTensor's storage is its local tensor's
                    self.storages[t.untyped_storage()] = None
            self.peak = max(self.peak, self.total())
            return out

    return TensorPeak()
