"""Triton kernel of the quantized linear: y = x·Ŵᵀ + b straight from the stored packed codes.

Ŵ[n, k] = (q[n, k] − z[n, g(k)])·s[n, g(k)] (``QuantizedLinear``): asymmetric codes q of 1–8 bits,
groups of ``group_size`` consecutive inputs in the stored column order (the last one may be ragged),
uint8 zero points z and float scales s per (output, group). One program computes a
BLOCK_M × BLOCK_N tile of y and walks K in BLOCK_K steps: it loads the x tile, decodes the
BLOCK_K × BLOCK_N tile of codes from the packed bytes, dequantizes it in registers (float32, where
(q − z)·s is exact) and multiplies with ``tl.dot``, accumulating in float32. The dense weight is never
written to memory.

Layout choices and why:

- **The checkpoint layout, read as it is.** Codes are row-major (out × in) and packed 8 at a time
  into ``bits`` bytes, code k of a group of 8 at bits [k·bits, (k+1)·bits) of its little-endian
  word (``core/packing.py``). For the code at flat index f = n·K + k the kernel reads the byte at
  (f // 8)·bits + (f % 8)·bits // 8 and the next one, shifts by (f % 8)·bits % 8 and masks: the same
  arithmetic for every width, since a code of ≤ 8 bits spans at most two bytes. Widths that divide 8
  never straddle a byte and skip the second read; 8-bit codes are the bytes themselves. No repacked
  copy is built, so GPU memory holds exactly the stored bytes. A kernel-specific layout (32-bit words
  per column, as Marlin-style kernels use) would load faster; it is not done here.
- **Act order: x is gathered in the kernel.** With a permutation, stored column k multiplies input
  perm[k], so the x tile is loaded at columns perm[k0:k0+BLOCK_K] (int32). This saves a separate
  index_select launch and an M × K copy per call (per-call overheads weigh most at decode, M = 1), and
  the gather only touches x, which is small and cache-resident; the weight bytes, the traffic that
  matters, are still read in stored order.
- **Scales and zeros per element of the tile, by group index.** g = k // group_size is computed once
  per K tile (a BLOCK_K vector), then s and z are gathered at (n, g): correct for any group size,
  ragged last group included, with no requirement that BLOCK_K divide the group.
- **Precision.** The dequantized tile is rounded to x's dtype before the product, as
  ``F.linear(x, Ŵ.to(x.dtype))`` rounds it, so float16/bfloat16 activations use tensor cores; float32
  activations multiply in full IEEE float32 (``input_precision="ieee"``, not TF32, matching PyTorch's
  default ``allow_tf32=False``); so do bfloat16 ones under ``TRITON_INTERPRET=1`` (the interpreter
  cannot multiply bfloat16; see :func:`quantized_matmul`). The bias, rounded to x's dtype as F.linear
  takes it, is added to the float32 accumulator; y is rounded to x's dtype once.

Not done: split-K (at M = 1 a 576-output layer is only cdiv(576, BLOCK_N) programs, too few to fill a
large GPU), autotuning of the block sizes; speed was not measured (no GPU where this was written).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _quantized_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, y_ptr,
                             M, N, K, G, group_size, n_bytes,
                             stride_xm, stride_xk, stride_ym, stride_yn,
                             BITS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                             DOT_FLOAT32: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rn64 = rn.to(tl.int64)
    x_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        if HAS_PERM:
            col = tl.load(perm_ptr + rk, mask=mask_k, other=0).to(tl.int64)
        else:
            col = rk.to(tl.int64)
        xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + col[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # the weight tile transposed (BLOCK_K × BLOCK_N), so that tl.dot(x, w) needs no transpose
        mask_w = mask_k[:, None] & mask_n[None, :]
        flat = rn64[None, :] * K + rk[:, None]
        if BITS == 8:
            code = tl.load(q_ptr + flat, mask=mask_w, other=0).to(tl.int32)
        else:
            bit = (flat % 8) * BITS
            byte = (flat // 8) * BITS + bit // 8
            word = tl.load(q_ptr + byte, mask=mask_w, other=0).to(tl.int32)
            if 8 % BITS != 0:                     # 3, 5, 6, 7 bits: a code may straddle two bytes
                high = tl.load(q_ptr + byte + 1, mask=mask_w & (byte + 1 < n_bytes), other=0).to(tl.int32)
                word = word | (high << 8)
            code = (word >> (bit % 8).to(tl.int32)) & ((1 << BITS) - 1)
        group = rk // group_size
        meta = rn64[None, :] * G + group[:, None]
        scale = tl.load(s_ptr + meta, mask=mask_w, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + meta, mask=mask_w, other=0).to(tl.float32)
        w = (code.to(tl.float32) - zero) * scale
        w = w.to(x_dtype)                         # as F.linear(x, Ŵ.to(x.dtype)) rounds it
        if DOT_FLOAT32:
            acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(x_dtype).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def block_sizes(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): the smallest M tile tl.dot takes (16) for decode-sized batches, and
    narrower N tiles there so that more programs share the weight stream. Not tuned (no GPU here)."""
    if m <= 16:
        return 16, 32, 64
    if m <= 64:
        return 32, 64, 64
    return 64, 64, 64


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     block_m: int | None = None, block_n: int | None = None,
                     block_k: int | None = None) -> torch.Tensor:
    """Same contract as ``reference.quantized_matmul`` (float32 accumulation).

    ``scales`` are the float values (the module's raw-bits buffer viewed as its float dtype),
    contiguous out × groups like ``zeros``; ``perm`` is int32 and contiguous.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"the quantized kernel takes 1–8-bit codes, got {bits}")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m, n, groups = x2.shape[0], scales.shape[0], scales.shape[1]
    default_m, default_n, default_k = block_sizes(m)
    block_m, block_n, block_k = block_m or default_m, block_n or default_n, block_k or default_k
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    # float32 multiplies in IEEE float32; so does bfloat16 under the interpreter, whose tl.dot multiplies
    # bfloat16 operands' raw bit patterns (Triton issue 11584; the interpreter keeps bfloat16 as uint16):
    # the operands are already bfloat16 values, so their float32 product is what tensor cores compute
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    dot_float32 = x.dtype == torch.float32 or (interpreted and x.dtype == torch.bfloat16)
    # unused pointer arguments still need a tensor: pass one that is never read
    perm_arg = perm if perm is not None else qweight
    bias_arg = bias if bias is not None else qweight
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    # Triton launches on the current device, which need not be x's
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _quantized_matmul_kernel[grid](x2, qweight, scales, zeros, perm_arg, bias_arg, y,
                                       m, n, k, groups, group_size, qweight.numel(),
                                       x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
                                       BITS=bits, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
                                       DOT_FLOAT32=dot_float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*lead, n)
