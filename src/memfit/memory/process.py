"""Process-level memory: the kernel's high-water mark on Linux, the caching allocator's peaks on CUDA."""

from __future__ import annotations

import re
import resource
import sys

import torch

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss() -> int | None:
    """Resident set size in bytes (None where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def reset_peak(device: torch.device | None = None) -> bool:
    """Start a new high-water mark window. Returns False where the platform cannot reset it."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def peak(device: torch.device | None = None) -> int | None:
    """Peak bytes since the last `reset_peak`: CUDA reserved memory, or the process's VmHWM."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: lifetime peak, not resettable
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024
    return kib * 1024
