"""Which device a run computes on: ``runtime.device`` resolved once, the same way by every command."""
from __future__ import annotations

import torch

from ..errors import LrcompressError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a device, else the CPU; ``cuda`` without one is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LrcompressError("runtime.device is 'cuda' but no CUDA device is available")
    return torch.device(name)
