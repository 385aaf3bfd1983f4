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


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on these tensors now."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def use_triton(*tensors: torch.Tensor) -> bool:
    """The kernel runs only on CUDA tensors of a dtype it supports, with Triton present."""
    return (all(t.is_cuda for t in tensors) and triton_available()
            and all(t.dtype in (torch.float16, torch.bfloat16, torch.float32) for t in tensors
                    if t.is_floating_point()))


def sparse_dict_matmul(z: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The kernel has no backward: where autograd must see through the product (a distillation trains the
    dictionary or the values) the reference runs, on every device."""
    if use_triton(z, indices, values) and not needs_grad(z, values):
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


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int, perm: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Ŵᵀ + b from packed codes (``reference.quantized_matmul`` has the contract); the kernel takes
    1–8-bit codes."""
    tensors = [t for t in (x, qweight, scales, zeros, perm, bias) if t is not None]
    if 1 <= bits <= 8 and use_triton(*tensors):
        from .quantized import quantized_matmul as kernel

        return kernel(x, qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
                      bits, group_size, None if perm is None else perm.to(torch.int32).contiguous(),
                      None if bias is None else bias.contiguous())
    return reference.quantized_matmul(x, qweight, scales, zeros, bits, group_size, perm, bias)
