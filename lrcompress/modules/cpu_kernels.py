"""QuantizedLinear on PyTorch's packed weight-only int4 CPU kernel, built once when a model is loaded.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero)`` (torch ≥ 2.5) computes
x·Wᵀ with W[n, k] = (c[n, k] − 8)·scale[g, n] + zero[g, n] for 4-bit codes c packed two per byte by
``_convert_weight_to_int4pack_for_cpu``. Its constraints (checked in torch 2.13): group ∈ {32, 64,
128, 256}, K divisible by the group, N divisible by 16, and x, scale and zero in one float dtype. It
dequantizes each weight in float32 and accumulates in float32; only its inputs and its output are
rounded to that dtype. At batch 1 on CPU, with **bfloat16** activations it is faster than a dense float32
``F.linear``; with float32 or float16 activations it falls back to scalar code, far slower (bench/RESULTS.md
has the measurements). So the activations are rounded to
bfloat16 for the kernel and the output is cast back — with the bfloat16 rounding of the scales, the
one numerical difference from the dequantized reference (``QuantizedLinear.dense_weight``): relative
output error ≈ 2⁻⁸, small beside the quantization error itself.

How lrcompress's codes map on the kernel (asymmetric codes of 1–8 bits, groups along the inputs in
the stored column order, an optional act-order permutation of the inputs):

- codes of ≤ 4 bits are one 4-bit plane with scale s and zero (8 − z)·s (|8 − z| ≤ 15 keeps the
  bfloat16 rounding of the zero at most ~0.03 of a quantization step);
- codes of 5–8 bits are first centred as 8-bit codes, c' = c + 128 − 2^(bits−1), then split into two
  planes, c' = 16·hi + lo, laid side by side along the inputs (K' = 2K) and multiplied in **one**
  kernel call by x repeated twice, [x, x]: scales 16·s (hi) and s (lo). The kernel adds each plane's
  zero to every weight of its group, so the two planes' zeros must sum to (136 − z')·s — a number too
  large to round to bfloat16 (up to ~0.3 of a step off); it is stored as a two-term bfloat16
  expansion, zero_hi = bf16((136 − z')·s) and zero_lo = bf16((136 − z')·s − zero_hi), which the
  kernel adds in float32 (error ≈ 2⁻¹⁷ of the offset);
- the kernel group: the largest of {256, 128, 64, 32} that divides the group size *and* the number
  of inputs when there is one (group 128 over 576 inputs runs as kernel groups of 64, so x needs no
  padding: a pad costs as much as a quarter of the kernel call at batch 1), else the largest that
  divides the group size (96 → 3 × 32); sizes that no kernel group divides (16, 100) cannot use the
  kernel (:func:`kernel_group` is None);
- K not a multiple of the kernel group, N not a multiple of 16: codes are padded (zero scale), x is
  padded with zeros, the extra outputs are cut off;
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


def kernel_group(group_size: int, in_features: int | None = None) -> int | None:
    """The kernel group for ``group_size``: the largest kernel group dividing it and, where one
    does, also ``in_features`` (no padding of x); None if no kernel group divides ``group_size``."""
    dividing = [g for g in KERNEL_GROUPS if group_size % g == 0]
    if in_features is not None:
        unpadded = [g for g in dividing if in_features % g == 0]
        dividing = unpadded or dividing
    return dividing[0] if dividing else None


class PackedInt4Weight:
    """A QuantizedLinear's weight in the int4 kernel's layout (one 4-bit plane, or two side by side)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, perm: torch.Tensor | None) -> None:
        """``codes`` (N × K, stored order), ``scales`` and ``zeros`` (N × groups), ``perm`` or None."""
        self.out_features, self.in_features = codes.shape
        group = kernel_group(group_size, self.in_features)
        if group is None:
            raise ValueError(f"group size {group_size} has no kernel group among {KERNEL_GROUPS}")
        self.group = group
        self.padded_in = math.ceil(self.in_features / group) * group
        self.padded_out = math.ceil(self.out_features / N_MULTIPLE) * N_MULTIPLE
        self.perm = None if perm is None else perm.long()
        kernel_groups = self.padded_in // group
        # the stored group of every kernel group (kernel groups never straddle a stored group)
        stored = torch.arange(kernel_groups) * group // group_size
        scale = _pad_rows(scales.to(torch.float32), self.padded_out)[:, stored]
        zero = _pad_rows(zeros.to(torch.float32), self.padded_out)[:, stored]
        codes = F.pad(codes.to(torch.int32), (0, self.padded_in - self.in_features, 0,
                                              self.padded_out - self.out_features))
        self.two_planes = bits > 4
        if not self.two_planes:
            zero_point = (8 - zero) * scale
        else:
            codes = codes + (128 - 2 ** (bits - 1))          # centred as 8-bit codes c'
            offset = (136 - 128 + 2 ** (bits - 1) - zero) * scale
            zero_hi = offset.to(KERNEL_DTYPE).to(torch.float32)
            codes = torch.cat([codes >> 4, codes & 15], dim=1)
            scale = torch.cat([16 * scale, scale], dim=1)
            zero_point = torch.cat([zero_hi, offset - zero_hi], dim=1)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.scale_zero = torch.stack([scale.T, zero_point.T], dim=-1).to(KERNEL_DTYPE).contiguous()

    def tensors(self) -> list[torch.Tensor]:
        """What this layout holds (for memory accounting)."""
        return [t for t in (self.packed, self.scale_zero, self.perm) if t is not None]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (… × in) → x·Wᵀ (… × out) in x's dtype."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        low = x.to(KERNEL_DTYPE)
        if self.two_planes:
            low = torch.cat([low, low], dim=1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(low, self.packed, self.group, self.scale_zero)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0]))
