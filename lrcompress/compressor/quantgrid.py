"""The asymmetric integer grid shared by ``rtn``, ``gptq`` and the quantized EoRA factors.

For a group of weights w (one row, ``group_size`` consecutive inputs): the range [min(w, 0),
max(w, 0)] (zero always inside, as in GPTQ's quantizer, so that 0 is exactly representable) is
cut into 2^bits − 1 steps: s = (max − min)/(2^bits − 1), z = round(−min/s), q = clamp(round(w/s) + z,
0, 2^bits − 1), ŵ = (q − z)·s. An all-zero group gets the range [−1, 1]. The scale is rounded to its
storage format *before* the codes are computed, and clamped at that format's smallest normal number,
so that the stored module reproduces exactly what the quantizer computed.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..modules import QuantizedLinear
from ..modules.quantized import SCALE_FORMATS
from .base import CompressorConfig

ScaleDtype = Literal["float16", "bfloat16", "float32"]


class QuantConfig(CompressorConfig):
    """Options of the integer grid."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: int | None = Field(128, ge=1, description="inputs sharing one scale/zero (null: whole row)")
    scale_dtype: ScaleDtype = Field("float16", description="storage format of the scales")
    apply_to: Literal["weight", "factors"] = Field(
        "weight", description="weight: quantize the module's (dense) weight; factors: quantize the factors an "
                              "earlier low-rank or dictionary stage made of it (docs/quantized-factors.md)")

    def width(self, in_features: int) -> int:
        return min(self.group_size or in_features, in_features)


def fit_grid(group: torch.Tensor, bits: int, scale_dtype: ScaleDtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (each of shape rows,, float64) for every row of ``group`` (rows × k)."""
    maxq = 2**bits - 1
    g = group.to(torch.float64)
    low = g.amin(dim=1).clamp(max=0.0)
    high = g.amax(dim=1).clamp(min=0.0)
    empty = (high - low) == 0
    low = torch.where(empty, -torch.ones_like(low), low)
    high = torch.where(empty, torch.ones_like(high), high)
    storage = SCALE_FORMATS[scale_dtype][0]
    scale = ((high - low) / maxq).clamp_min(torch.finfo(storage).tiny).to(storage).to(torch.float64)
    zero = torch.round(-low / scale).clamp(0, maxq)
    return scale, zero


def fit_symmetric(group: torch.Tensor, bits: int, scale_dtype: ScaleDtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric grid for every row of ``group``: zero point 2^(bits−1), step max|w|/(2^(bits−1) − 1), so
    that the codes span ±max|w| with 0 exact (llama.cpp's Q8_0 at 8 bits: d = max|w|/127). The lowest code
    0 is never produced by rounding; the grid is one level narrower than the asymmetric one."""
    half = 2 ** (bits - 1)
    amax = group.to(torch.float64).abs().amax(dim=1)
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)
    storage = SCALE_FORMATS[scale_dtype][0]
    scale = (amax / (half - 1)).clamp_min(torch.finfo(storage).tiny).to(storage).to(torch.float64)
    return scale, torch.full_like(scale, float(half))


def quantize(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``values`` (rows × k, or rows,) on the grid of each row; int64."""
    if values.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(values.to(torch.float64) / scale) + zero, 0, 2**bits - 1).to(torch.int64)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if codes.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return (codes.to(torch.float64) - zero) * scale


def round_to_nearest(weight: torch.Tensor, config: QuantConfig, symmetric: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out × in), scales and zeros (out × groups) of plain round-to-nearest quantization, on the
    asymmetric grid (``fit_grid``) or the symmetric one (``fit_symmetric``)."""
    fit = fit_symmetric if symmetric else fit_grid
    out_features, in_features = weight.shape
    width = config.width(in_features)
    groups = math.ceil(in_features / width)
    codes = torch.empty(out_features, in_features, dtype=torch.int64, device=weight.device)
    scales = torch.empty(out_features, groups, dtype=torch.float64, device=weight.device)
    zeros = torch.empty_like(scales)
    for index in range(groups):
        columns = slice(index * width, min((index + 1) * width, in_features))
        scale, zero = fit(weight[:, columns], config.bits, config.scale_dtype)
        codes[:, columns] = quantize(weight[:, columns], scale, zero, config.bits)
        scales[:, index], zeros[:, index] = scale, zero
    return codes, scales, zeros


def quantized_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, config: QuantConfig,
                     bias: torch.Tensor | None, dtype: torch.dtype,
                     perm: torch.Tensor | None = None) -> QuantizedLinear:
    return QuantizedLinear.from_codes(codes, scales, zeros, config.bits, config.width(codes.shape[1]),
                                      config.scale_dtype, bias, dtype, perm)
