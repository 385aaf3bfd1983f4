"""Triton kernels, each with a pure-torch reference and a dispatch between them.

Import the dispatching functions from here; ``reference`` holds the torch versions, ``sparse_dict``
and ``omp`` the kernels (they import triton, so only load them where it is installed).
"""
from .dispatch import omp_step, sparse_dict_matmul, triton_available, use_triton

__all__ = ["omp_step", "sparse_dict_matmul", "triton_available", "use_triton"]
