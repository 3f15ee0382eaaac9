"""Memory: measuring a run's peak, enforcing the CPU cap, and giving memory back after a failure.

The driver runs many configurations in one worker process, so a run that runs out of memory
must leave the process as it found it: the next run's peak should equal what a fresh process
would measure. On CUDA that means dropping every tensor the run made and emptying the caching
allocator; on CPU, also handing freed heap pages back to the OS (`malloc_trim`), because
glibc otherwise keeps them and the process's RSS -- what the CPU cap and the peak measure --
stays high.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from pathlib import Path

import psutil
import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class MemoryCapExceeded(RuntimeError):
    """The process grew past `RunConfig.memory_cap_bytes` (the CPU stand-in for a CUDA OOM)."""

    def __init__(self, rss_bytes: int, cap_bytes: int) -> None:
        self.rss_bytes = rss_bytes
        self.cap_bytes = cap_bytes
        super().__init__(f"process RSS {rss_bytes} bytes exceeds the cap of {cap_bytes} bytes")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM, the CPU cap, and allocator failures torch reports as RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryCapExceeded | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def rss_bytes() -> int:
    """Resident set size of this process right now (from /proc where it exists: ~50x cheaper
    than psutil, and it is read after every forward and backward)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return psutil.Process(os.getpid()).memory_info().rss


def _hwm_bytes() -> int | None:
    """The kernel's RSS high-water mark for this process (Linux), or None where unavailable."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Restart the kernel's RSS high-water mark at the current RSS (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class MemoryGuard:
    """Tracks one run's peak memory and enforces the CPU memory cap.

    On CUDA the peak is `max_memory_allocated` since the run began. On CPU it is the RSS
    high-water mark since the run began: the kernel's own (reset at run start) where Linux
    allows it, else the largest RSS seen by `check()`, which runs after every forward and
    backward -- the two points where activations and gradients are at their largest.
    """

    def __init__(self, device: torch.device, cap_bytes: int | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.cap_bytes = cap_bytes
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self._kernel_hwm = not self.cuda and _reset_hwm()
        self._seen = 0 if self.cuda else rss_bytes()

    def check(self) -> None:
        """Raise `MemoryCapExceeded` when a CPU run has grown past its cap."""
        if self.cuda or (self.cap_bytes is None and self._kernel_hwm):
            return  # the kernel keeps the peak; nothing to enforce
        rss = rss_bytes()
        self._seen = max(self._seen, rss)
        if self.cap_bytes is not None and rss > self.cap_bytes:
            raise MemoryCapExceeded(rss, self.cap_bytes)

    def peak_bytes(self) -> int:
        """The run's peak so far: CUDA bytes allocated, or process RSS on CPU."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _hwm_bytes() if self._kernel_hwm else None
        return max(self._seen, hwm or 0)


def release_memory() -> None:
    """Give back what dropped tensors held: Python cycles, the CUDA cache, the C heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name and os.uname().sysname == "Linux":
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
