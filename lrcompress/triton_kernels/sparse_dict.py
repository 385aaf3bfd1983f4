"""Triton kernel of the sparse-dictionary forward: y[m, j] = Σ_t z[m, idx[t, j]] · val[t, j].

One program computes a BLOCK_M × BLOCK_N tile of y: for each of the s slots it loads the tile's
indices and values (a row of the fixed-nnz layout, contiguous in j), gathers the matching columns of
z and accumulates in float32. No dense k×n coefficient matrix is ever formed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_dict_kernel(z_ptr, idx_ptr, val_ptr, y_ptr, M, N, S,
                        stride_zm, stride_zk, stride_it, stride_in, stride_vt, stride_vn, stride_ym, stride_yn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, S):
        idx = tl.load(idx_ptr + t * stride_it + rn * stride_in, mask=mask_n, other=0).to(tl.int64)
        val = tl.load(val_ptr + t * stride_vt + rn * stride_vn, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rm[:, None] * stride_zm + idx[None, :] * stride_zk,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += z * val[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def sparse_dict_matmul(z: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                       block_m: int = 32, block_n: int = 64) -> torch.Tensor:
    """Same contract as ``reference.sparse_dict_matmul`` (float32 accumulation)."""
    lead = z.shape[:-1]
    z2 = z.reshape(-1, z.shape[-1])
    m, n, s = z2.shape[0], values.shape[1], values.shape[0]
    y = torch.empty(m, n, dtype=z.dtype, device=z.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _sparse_dict_kernel[grid](z2, indices, values, y, m, n, s,
                              z2.stride(0), z2.stride(1), indices.stride(0), indices.stride(1),
                              values.stride(0), values.stride(1), y.stride(0), y.stride(1),
                              BLOCK_M=block_m, BLOCK_N=block_n)
    return y.reshape(*lead, n)
