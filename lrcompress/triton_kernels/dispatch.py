"""Pick the Triton kernel for CUDA tensors and the torch reference everywhere else.

``LRCOMPRESS_KERNELS=reference`` forces the reference (to compare or to debug on a GPU). Triton is
imported lazily: a CPU install never needs it, and tests can set ``TRITON_INTERPRET`` first.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import reference

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    if os.environ.get("LRCOMPRESS_KERNELS", "auto") == "reference":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.info("triton is not installed: the torch references run on every device")
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """The kernel runs only on CUDA tensors of a dtype it supports, with Triton present."""
    return (all(t.is_cuda for t in tensors) and triton_available()
            and all(t.dtype in (torch.float16, torch.bfloat16, torch.float32) for t in tensors
                    if t.is_floating_point()))


def sparse_dict_matmul(z: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if use_triton(z, indices, values):
        from .sparse_dict import sparse_dict_matmul as kernel

        return kernel(z.contiguous(), indices.contiguous(), values.contiguous())
    return reference.sparse_dict_matmul(z, indices, values)


def omp_step(gram: torch.Tensor, alpha: torch.Tensor, alpha0: torch.Tensor, support: torch.Tensor,
             linv: torch.Tensor, y: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor,
             step: int, tol: float) -> None:
    if use_triton(gram, alpha, linv):
        from .omp import omp_step as kernel

        return kernel(gram, alpha, alpha0, support, linv, y, selected, valid, step, tol)
    return reference.omp_step(gram, alpha, alpha0, support, linv, y, selected, valid, step, tol)
