"""Triton kernels, each with a pure-torch reference and a dispatch between them.

Import the dispatching functions from here; ``reference`` holds the torch versions, ``sparse_dict``,
``omp`` and ``quantized`` the kernels (they import triton, so only load them where it is installed).
"""
from .dispatch import omp_step, quantized_matmul, sparse_dict_matmul, triton_available, use_triton

__all__ = ["omp_step", "quantized_matmul", "sparse_dict_matmul", "triton_available", "use_triton"]
