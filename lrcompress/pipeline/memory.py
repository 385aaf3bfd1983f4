"""Peak memory: host RSS (from the kernel's high-water mark) and CUDA allocations so far, and the peak of
one phase (``PeakMemory``).

For one phase, CPU has no allocator counter to reset and the process's lifetime peak (ru_maxrss)
would include whatever ran before, so ``PeakMemory`` samples the resident set (``/proc/self/statm``)
in a background thread while the phase runs and reports the growth over the value at entry.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Any

import torch

SAMPLE_SECONDS = 0.005


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_cuda_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def describe_peak_memory() -> str:
    text = f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
    cuda = peak_cuda_bytes()
    return text + (f", peak CUDA {cuda / 2**30:.2f} GiB" if cuda is not None else "")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.report()``."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated during the pass"
        else:
            self.baseline_bytes = _rss_bytes()
            if self.baseline_bytes is not None:
                self.peak_bytes = self.baseline_bytes
                self.method = f"CPU resident set sampled every {SAMPLE_SECONDS * 1000:.0f} ms during the pass"
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
            else:
                self.method = "unavailable (no /proc/self/statm)"
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > (self.peak_bytes or 0):
                self.peak_bytes = rss
            time.sleep(SAMPLE_SECONDS)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()

    def report(self) -> dict[str, Any]:
        """Peak and baseline in bytes, the growth over the baseline, and how it was measured."""
        growth = None
        if self.peak_bytes is not None and self.baseline_bytes is not None:
            growth = max(self.peak_bytes - self.baseline_bytes, 0)
        return {"peak_memory_bytes": self.peak_bytes, "baseline_memory_bytes": self.baseline_bytes,
                "peak_memory_growth_bytes": growth, "memory_measure": self.method}


def image_peak_rss_bytes() -> int:
    """Peak resident set of this process image: VmHWM, which execve resets, unlike ru_maxrss, which a
    child started by fork + exec inherits from its parent (a benchmark's parent, a test runner)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()
