"""Each process's measured peak memory, phase by phase: what ``caopd memory`` estimates, as it ran.

Host memory is the peak resident set since the phase began: Linux's VmHWM, reset at the start of a
phase by writing 5 to /proc/self/clear_refs; where that is unavailable, ru_maxrss, the peak since
the process started (never reset, so a later phase reads at least an earlier one's peak). GPU
memory is torch's peak allocation on the process's device, reset likewise. The trainer records the
phases (load, the steps, the final save) of every process in ``memory.json`` of the run folder.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

GIB = 2**30
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peaks() -> None:
    """Start a phase: the peaks read next are those since now."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass  # not Linux (or not allowed): host_peak falls back to the peak since the start
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def host_peak_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peaks() -> dict[str, float]:
    """{"host_gib": peak resident GiB since the phase began, "gpu_gib": peak allocated on the GPU (CUDA only)}."""
    out = {"host_gib": host_peak_bytes() / GIB}
    if torch.cuda.is_available():
        out["gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out


def merge_phase(earlier: dict[str, float] | None, latest: dict[str, float]) -> dict[str, float]:
    """The larger of two readings of one phase, field by field (the steps: the worst step)."""
    if earlier is None:
        return dict(latest)
    return {key: max(earlier.get(key, 0.0), value) for key, value in latest.items()}
