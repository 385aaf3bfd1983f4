"""Peak memory so far: host RSS (from the kernel's high-water mark) and CUDA allocations."""
from __future__ import annotations

import resource
import sys

import torch


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
