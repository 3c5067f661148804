"""Peak memory of a training step: CUDA's allocator statistics on GPU, the process's peak RSS on CPU.

On Linux the RSS high-water mark (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs``, so
each step's peak can be read without a profiler.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["reset_peak", "peak_mb", "current_mb"]

_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def current_mb() -> float:
    """Memory in use now: CUDA allocated bytes, or the process RSS on CPU (MiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / 2**20
    return _status_kb("VmRSS") / 1024


def reset_peak() -> None:
    """Start a new peak window."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb() -> float:
    """Peak memory since :func:`reset_peak` (MiB); NaN where the platform cannot tell."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_kb("VmHWM") / 1024
