"""A training process's own memory: its measured peaks, phase by phase, and freed host memory
returned to the operating system.

Measured: host memory is the peak resident set since the phase began: Linux's VmHWM, reset at the
start of a phase by writing 5 to /proc/self/clear_refs; where that is unavailable, ru_maxrss, the
peak since the process started (never reset, so a later phase reads at least an earlier one's
peak). GPU memory is torch's peak allocation on the process's device, reset likewise. The trainer
records the phases (load, the steps, checkpoint saves, the final save) of every process in
``memory.json`` of the run folder: what ``caopd memory`` estimates, as it ran.

Returned: glibc's malloc serves tensors between its mmap threshold and 32 MiB from its heap once
a freed one has raised that threshold (its default, dynamic rule), and a freed heap block stays
resident unless it happens to be at the top. A process that frees a whole model it read (the main
process of a sharded load) or a step's activations then keeps them resident: measured here, 1 GiB
of a 1 GiB model stayed after the load and the step's peak grew 25 %. ``release_freed_memory``
fixes the threshold at 1 MiB (every larger tensor is its own mapping, unmapped when freed) and
trims what is already free. That costs a mapping and fresh pages for every such tensor: nothing
next to a large model's arithmetic on it, but for a model of a few MiB, whose every decoding step
allocates a few 1-4 MiB tensors, it doubled the demo's generation time (0.62 -> 1.14 s a step of
16 prompts x 8 samples, tiny-qwen3 on 2 CPU cores). So below ``SMALL_MODEL_BYTES`` of weights the
trainer sets the thresholds back to glibc's largest (32 MiB mappings, 64 MiB kept at the heap's
top): a few MiB may stay resident, which is nothing next to such a run's interpreter. A no-op
where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

import torch

GIB = 2**30
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1  # mallopt's parameter numbers in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
SMALL_MODEL_BYTES = 64 << 20


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_memory(model_bytes: int | None = None) -> None:
    """Large host tensors unmapped when freed from now on, and the free heap returned to the OS;
    for a model of fewer than ``SMALL_MODEL_BYTES`` (``model_bytes``: its weights), glibc's speed."""
    libc = _glibc()
    if libc is not None:
        if model_bytes is not None and model_bytes < SMALL_MODEL_BYTES:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        else:
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.malloc_trim(0)


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
