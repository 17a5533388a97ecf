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
