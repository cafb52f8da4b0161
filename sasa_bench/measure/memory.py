"""Peak memory of one step (a forward, or a forward + backward + optimizer step), per device.

What ``peak_mem_mb`` means, by ``mem_method``:

``cuda_max_allocated``
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the most bytes held in
    live tensors on the GPU at once during the step, *including* the weights, the input batch,
    gradients and optimizer state (the convention of timm's benchmark). Memory cached by the
    allocator but not in use is not counted.

``rss_hwm_delta`` (CPU, Linux)
    The process's resident-set high-water mark during the step minus its resident set just before
    it: the extra physical memory the step needed (activations, workspaces, gradients), *not*
    counting the weights and the input, which are already resident. It is exact rather than
    sampled: writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's peak-RSS counter
    (``VmHWM``), which the kernel updates before any page is released, so even a short spike is
    seen. Before the baseline we ``gc.collect()`` and ``malloc_trim(0)`` (glibc), so that memory
    freed earlier but kept by malloc cannot hide the step's growth.

``rss_sampled_delta`` (CPU, Linux without a writable ``clear_refs``)
    The same difference, with the peak taken by a background thread reading
    ``/proc/self/statm`` about every millisecond; a spike shorter than that can be missed.

``unavailable``
    No ``/proc`` (not Linux): ``peak_mem_mb`` is ``None``.

The CPU figures count the whole process, so allocations by oneDNN/MKL workspaces and thread
pools are included — the memory the workload actually costs, not just torch's tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

MB = 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class PeakMemory:
    mb: float | None
    method: str


def rss_bytes() -> int | None:
    """The process's resident set size now (``/proc/self/statm``), or None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm_bytes() is not None
    except OSError:
        return False


_libc: ctypes.CDLL | None | bool = False  # False = not looked up yet


def _malloc_trim() -> None:
    """Give memory that malloc keeps after ``free`` back to the OS (glibc only; else a no-op)."""
    global _libc
    if _libc is False:
        try:
            name = ctypes.util.find_library("c")
            _libc = ctypes.CDLL(name) if name else None
            if _libc is not None and not hasattr(_libc, "malloc_trim"):
                _libc = None
        except OSError:
            _libc = None
    if _libc:
        _libc.malloc_trim(0)


class _Sampler(threading.Thread):
    """Reads the RSS about every ``interval`` seconds and keeps the maximum."""

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = rss_bytes() or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_bytes() or 0)
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes() or 0)


def peak_memory(step: Callable[[], None], device: torch.device) -> PeakMemory:
    """Run ``step`` once and return its peak memory (see the module docstring for the meaning)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device) / MB, "cuda_max_allocated")
    if device.type != "cpu" or rss_bytes() is None:
        step()
        return PeakMemory(None, "unavailable")
    gc.collect()
    _malloc_trim()
    baseline = rss_bytes() or 0
    if _reset_hwm():
        step()
        peak = max(_hwm_bytes() or 0, rss_bytes() or 0)
        method = "rss_hwm_delta"
    else:
        sampler = _Sampler()
        sampler.start()
        try:
            step()
        finally:
            peak = sampler.stop()
        method = "rss_sampled_delta"
    return PeakMemory(max(0, peak - baseline) / MB, method)
