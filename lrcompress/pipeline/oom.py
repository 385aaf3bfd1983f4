"""Out-of-memory errors that say where they happened and which recipe knobs help.

A bare ``torch.cuda.OutOfMemoryError`` deep inside a 30-layer run tells the user neither which layer
or module nor what to change; ``naming_out_of_memory`` turns it (and the CPU allocator's failures)
into an ``OutOfMemory`` error naming the place, the peak memory so far, and the current values of
the settings that lower memory.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..errors import OutOfMemory
from .memory import describe_peak_memory

from .settings import PipelineSettings

# What the CPU allocator says when an allocation fails (it raises a plain RuntimeError).
CPU_MESSAGES = ("not enough memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in CPU_MESSAGES)


def memory_hints(settings: "PipelineSettings") -> str:
    """The knobs that lower memory, with their current values."""
    collective = settings.collective
    samples = "?" if settings.num_samples is None else str(settings.num_samples)
    per_process = (f", {collective.world_size} processes share them" if collective.world_size > 1 else "")
    return (f"runtime.batch_size (now {settings.batch_size}) sets the windows per forward call; "
            f"runtime.offload_device (now {settings.offload.type}) keeps every window's activations there "
            f"('cpu' frees the GPU); calibration.num_samples (now {samples}{per_process}) sets how many "
            "windows' activations are kept")


@contextlib.contextmanager
def naming_out_of_memory(where: str | Callable[[], str], settings: "PipelineSettings") -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as ``OutOfMemory`` naming ``where`` (a string,
    or a function giving it, called only when the error happens)."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        place = where() if callable(where) else where
        raise OutOfMemory(f"out of memory {place} ({describe_peak_memory()}). Lower memory with: "
                          f"{memory_hints(settings)}") from error
