"""Triton kernel of one Batch-OMP step (selection + Cholesky-inverse row append), one program per column.

It fuses what ``reference.omp_step`` does with a dozen batched torch ops: the masked argmax of |α|,
the gather g = G[I, i], w = L⁻¹g, δ = √(G_ii − ‖w‖²), the new row −wᵀL⁻¹/δ of L⁻¹ and the new
coefficient y_t. The α update that follows (one GEMM over all columns) stays in torch (cuBLAS).
L⁻¹ is walked in BLOCK_T × BLOCK_T tiles, so any sparsity fits in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _omp_step_kernel(gram_ptr, alpha_ptr, alpha0_ptr, support_ptr, linv_ptr, y_ptr, selected_ptr, valid_ptr,
                     w_ptr, K, S, t, tol, stride_g,
                     BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # 1. masked argmax of |alpha| (first index on ties, like torch.argmax)
    best_val = tl.full([], -1.0, tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        in_k = offs < K
        a = tl.abs(tl.load(alpha_ptr + b * K + offs, mask=in_k, other=0.0)).to(tl.float32)
        sel = tl.load(selected_ptr + b * K + offs, mask=in_k, other=1)
        a = tl.where(in_k & (sel == 0), a, -1.0)
        chunk_max = tl.max(a, 0)
        chunk_idx = tl.argmax(a, 0).to(tl.int32) + k0
        better = chunk_max > best_val
        best_idx = tl.where(better, chunk_idx, best_idx)
        best_val = tl.where(better, chunk_max, best_val)
    atom = best_idx.to(tl.int64)
    tl.store(selected_ptr + b * K + atom, 1)
    tl.store(support_ptr + b * S + t, atom)
    g_ii = tl.load(gram_ptr + atom * stride_g + atom)
    row_base = linv_ptr + b * S * S
    # 2. w = L⁻¹ g, with g = G[I, atom] (zero on invalid slots); also ‖w‖² and w·y
    norm2 = g_ii * 0.0
    wy = g_ii * 0.0
    for r0 in range(0, t, BLOCK_T):
        rr = r0 + tl.arange(0, BLOCK_T)
        in_r = rr < t
        acc = tl.zeros((BLOCK_T,), dtype=g_ii.dtype)
        for c0 in range(0, r0 + BLOCK_T, BLOCK_T):
            cc = c0 + tl.arange(0, BLOCK_T)
            in_c = cc < t
            sup = tl.load(support_ptr + b * S + cc, mask=in_c, other=0)
            ok_c = tl.load(valid_ptr + b * S + cc, mask=in_c, other=0)
            g = tl.load(gram_ptr + sup * stride_g + atom, mask=in_c & (ok_c != 0), other=0.0)
            tile = tl.load(row_base + rr[:, None] * S + cc[None, :], mask=in_r[:, None] & in_c[None, :], other=0.0)
            acc += tl.sum(tile * g[None, :], 1)
        tl.store(w_ptr + b * S + rr, acc, mask=in_r)
        yr = tl.load(y_ptr + b * S + rr, mask=in_r, other=0.0)
        norm2 += tl.sum(acc * acc, 0)
        wy += tl.sum(acc * yr, 0)
    tl.debug_barrier()
    d2 = g_ii - norm2
    ok = d2 > tol * g_ii
    delta = tl.where(ok, tl.sqrt(tl.maximum(d2, 1e-300)), 1.0)
    # 3. new row of L⁻¹: −(wᵀ L⁻¹)/δ (zero when the atom is already in the span)
    for c0 in range(0, t, BLOCK_T):
        cc = c0 + tl.arange(0, BLOCK_T)
        in_c = cc < t
        acc = tl.zeros((BLOCK_T,), dtype=g_ii.dtype)
        for r0 in range(c0, t, BLOCK_T):
            rr = r0 + tl.arange(0, BLOCK_T)
            in_r = rr < t
            w = tl.load(w_ptr + b * S + rr, mask=in_r, other=0.0)
            tile = tl.load(row_base + rr[:, None] * S + cc[None, :], mask=in_r[:, None] & in_c[None, :], other=0.0)
            acc += tl.sum(tile * w[:, None], 0)
        tl.store(row_base + t * S + cc, tl.where(ok, -acc / delta, 0.0), mask=in_c)
    tl.store(row_base + t * S + t, 1.0 / delta)
    a0 = tl.load(alpha0_ptr + b * K + atom)
    tl.store(y_ptr + b * S + t, tl.where(ok, (a0 - wy) / delta, 0.0))
    tl.store(valid_ptr + b * S + t, ok.to(tl.int8))


def omp_step(gram: torch.Tensor, alpha: torch.Tensor, alpha0: torch.Tensor, support: torch.Tensor,
             linv: torch.Tensor, y: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor,
             step: int, tol: float, block_k: int = 256, block_t: int = 32) -> None:
    """Same contract as ``reference.omp_step``; every state tensor must be contiguous."""
    batch, k = alpha.shape
    s = support.shape[1]
    for name, tensor in (("alpha", alpha), ("alpha0", alpha0), ("support", support), ("linv", linv),
                         ("y", y), ("selected", selected), ("valid", valid)):
        if not tensor.is_contiguous():
            raise ValueError(f"omp_step: {name} must be contiguous")
    scratch = torch.empty(batch, s, dtype=linv.dtype, device=linv.device)
    _omp_step_kernel[(batch,)](gram, alpha, alpha0, support, linv, y, selected.view(torch.int8),
                               valid.view(torch.int8), scratch, k, s, step, tol, gram.stride(0),
                               BLOCK_K=block_k, BLOCK_T=block_t)
