"""QuantizedLinear on PyTorch's packed weight-only int4 CPU kernel, built once when a model is loaded.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero)`` (torch ≥ 2.5) computes
x·Wᵀ with W[n, k] = (c[n, k] − 8)·scale[g, n] + zero[g, n] for 4-bit codes c packed two per byte by
``_convert_weight_to_int4pack_for_cpu``. Its constraints (checked in torch 2.13): group ∈ {32, 64,
128, 256}, K divisible by the group, N divisible by 16, and x, scale and zero in one float dtype.
Measured on this project's AVX-512 CPU at batch 1 (bench/RESULTS.md): with **bfloat16** activations it
takes about half the time of a dense float32 ``F.linear``; with float32 or float16 activations it
falls back to scalar code, 100–400× slower. So the activations are rounded to bfloat16 for the kernel
and the output is cast back — the one numerical difference from the dequantized reference
(``QuantizedLinear.dense_weight``): relative output error ≈ 2⁻⁸ (bfloat16 rounding of x, of the
scales and of the kernel's output), small beside the quantization error itself.

How lrcompress's codes map on the kernel (asymmetric codes of 1–8 bits, groups along the inputs in
the stored column order, an optional act-order permutation of the inputs):

- codes of ≤ 4 bits are one 4-bit plane with scale s and zero (8 − z)·s (|8 − z| ≤ 15 keeps the
  bfloat16 rounding of the zero at most ~0.03 of a quantization step);
- codes of 5–8 bits are first centred as 8-bit codes, c' = c + 128 − 2^(bits−1) (so that each plane
  straddles the kernel's −8 and its bfloat16 partial sums do not cancel), then split into two planes,
  c' = 16·hi + lo, with scales 16·s and s and zero 0; the remaining offset (136 − z')·s — too large to
  round to bfloat16 — is added in float32 from the per-group sums of x: y += Σ_g (Σ_{k∈g} x_k)·(136 − z'_g)·s_g;
- a group size the kernel lacks is split into kernel groups that divide it (96 → 3 × 32); sizes that
  no kernel group divides (16, 100) cannot use the kernel (:func:`kernel_group` is None);
- a ragged last group, K not a multiple of the group, N not a multiple of 16: codes are padded
  (zero scale), x is padded with zeros, the extra outputs are cut off;
- act order: x is permuted into the stored column order first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KERNEL_GROUPS = (256, 128, 64, 32)
KERNEL_DTYPE = torch.bfloat16
N_MULTIPLE = 16


def int4_kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(group_size: int) -> int | None:
    """The largest kernel group size dividing ``group_size`` (None if there is none)."""
    return next((g for g in KERNEL_GROUPS if group_size % g == 0), None)


class PackedInt4Weight:
    """A QuantizedLinear's weight in the int4 kernel's layout (one or two 4-bit planes)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, perm: torch.Tensor | None) -> None:
        """``codes`` (N × K, stored order), ``scales`` and ``zeros`` (N × groups), ``perm`` or None."""
        group = kernel_group(group_size)
        if group is None:
            raise ValueError(f"group size {group_size} has no kernel group among {KERNEL_GROUPS}")
        self.out_features, self.in_features = codes.shape
        groups = scales.shape[1]
        self.padded_in = groups * group_size
        self.padded_out = math.ceil(self.out_features / N_MULTIPLE) * N_MULTIPLE
        self.group = group
        self.perm = None if perm is None else perm.long()
        repeat = group_size // group
        scale = _pad_rows(scales.to(torch.float32), self.padded_out).repeat_interleave(repeat, dim=1)
        zero = _pad_rows(zeros.to(torch.float32), self.padded_out).repeat_interleave(repeat, dim=1)
        codes = F.pad(codes.to(torch.int32), (0, self.padded_in - self.in_features, 0,
                                              self.padded_out - self.out_features))
        if bits <= 4:
            planes = [(codes, scale, (8 - zero) * scale)]
            self.offset = None
        else:
            # centred as 8-bit codes (c + shift), so that both planes straddle the kernel's −8
            shift = 128 - 2 ** (bits - 1)
            codes = codes + shift
            zero_planes = torch.zeros_like(scale)
            planes = [(codes >> 4, 16 * scale, zero_planes), (codes & 15, scale, zero_planes)]
            # per original group: (136 − z − shift)·s, as (groups × N) for x's per-group sums
            offset = (136 - shift - zeros.to(torch.float32)) * scales.to(torch.float32)
            self.offset = offset.T.contiguous()
            self.offset_group = group_size
        self.planes = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane, 1),
                        torch.stack([s.T, z.T], dim=-1).to(KERNEL_DTYPE).contiguous())
                       for plane, s, z in planes]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (… × in) → x·Wᵀ (… × out) in x's dtype."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        low = x.to(KERNEL_DTYPE)
        y = None
        for packed, scale_zero in self.planes:     # planes are summed in float32, not bfloat16
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(low, packed, self.group, scale_zero).to(x.dtype)
            y = part if y is None else y + part
        y = y[:, : self.out_features]
        if self.offset is not None:
            sums = x.view(x.shape[0], -1, self.offset_group).sum(dim=-1, dtype=torch.float32)
            y = y + (sums @ self.offset).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0]))
