"""Peak memory of one benchmark mode, on CUDA or on the host.

On CUDA the caching allocator's peak is exact. On the host we use the kernel's
resident-set high-water mark (VmHWM), which Linux lets a process reset by
writing ``5`` to ``/proc/self/clear_refs``; elsewhere host peaks are unknown.
"""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _host_rss_peak() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def read_peak(device: torch.device) -> int | None:
    """Peak bytes since :func:`reset_peak`: device allocations, or host RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _host_rss_peak()
