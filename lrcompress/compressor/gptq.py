"""``gptq``: GPTQ (Frantar et al., 2022), error-compensating quantization from second-order statistics.

Columns are quantized one at a time; the error of each is spread over the columns not yet quantized
through the inverse Hessian H⁻¹ of the layer-wise objective ‖XWᵀ − XŴᵀ‖² (H = 2XᵀX; the factor 2
cancels in the algorithm, so the calibration Gram G = XᵀX is used as is). As in the paper:

* damping: H + λ·mean(diag H)·I, λ = ``damping`` (paper: 0.01), raised ×10 on Cholesky failure and
  falling back to a clamped eigh (``linalg.whitening``, the path is recorded);
* the needed rows of H⁻¹ come from its upper Cholesky factor U (H⁻¹ = UᵀU): column i's error
  (w_i − q_i)/U_ii updates the later columns by U_i,i:;
* lazy batch updates: the updates stay inside a block of ``block_size`` columns and reach the rest
  of the matrix in one matrix product at the end of the block (same result, far fewer memory passes);
* ``act_order``: columns in order of decreasing diag(H) (the stored codes keep that order + ``perm``);
* grouping: a group's grid is fitted when its first column is reached, on the *current* (error-
  updated) weights of the group. Choice left open by the reference code: for columns beyond the
  current block the pending lazy updates are applied before fitting, so the result does not depend
  on ``block_size`` (with group and block sizes aligned, this is exactly the reference behaviour);
* inputs that are always zero (diag H = 0) get H_jj = 1 and W_:j = 0 (they never affect the output).

With ``apply_to: factors`` the factors of an earlier low-rank or dictionary stage are quantized instead,
each with the Gram of its own inputs (``factors``); dictionary values, whose every row has its own Hessian,
go through :func:`gptq_rows`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import Field

from ..errors import LrcompressError, NumericalError
from .base import register
from .linalg import CHOLESKY_RETRIES, DAMPING_GROWTH, whitening
from .quantgrid import QuantConfig, ScaleDtype, dequantize, fit_grid, quantize, quantized_linear
from .rtn import Quantized, QuantizingCompressor

log = logging.getLogger(__name__)


class GPTQConfig(QuantConfig):
    damping: float = Field(0.01, gt=0.0, description="λ in H + λ·mean(diag H)·I")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    act_order: bool = Field(False, description="quantize columns in order of decreasing diag(H)")


@dataclass
class GPTQResult:
    codes: torch.Tensor          # out × in, in the processing column order
    scales: torch.Tensor         # out × groups, float64
    zeros: torch.Tensor          # out × groups, float64
    perm: torch.Tensor | None    # processing order (act_order) or None
    loss: float                  # Σ (w − q)² / U_ii² / 2, the paper's per-layer loss proxy
    path: str


def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None,
                  scale_dtype: ScaleDtype, damping: float = 0.01, block_size: int = 128,
                  act_order: bool = False, name: str = "") -> GPTQResult:
    """Run GPTQ on ``weight`` (out × in) with input Gram ``gram`` (in × in); all in float64."""
    w = weight.to(torch.float64).clone()
    h = gram.to(device=w.device, dtype=torch.float64).clone()
    out_features, in_features = w.shape
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        log.info("%s: %d inputs never active; their weights are zeroed", name, int(dead.sum()))
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    upper, path = _inverse_cholesky(h, damping, name)

    width = min(group_size or in_features, in_features)
    groups = math.ceil(in_features / width)
    codes = torch.empty(out_features, in_features, dtype=torch.int64, device=w.device)
    scales = torch.empty(out_features, groups, dtype=torch.float64, device=w.device)
    zeros = torch.empty_like(scales)
    loss = 0.0
    scale = zero = None
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        u_block = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % width == 0:
                end = min(column + width, in_features)
                current = _current_columns(w, block, errors, upper, start, stop, i, end)
                scale, zero = fit_grid(current, bits, scale_dtype)
                scales[:, column // width], zeros[:, column // width] = scale, zero
            values = block[:, i]
            q = quantize(values, scale, zero, bits)
            codes[:, column] = q
            diff = values - dequantize(q, scale, zero)
            d = u_block[i, i]
            loss += float((diff**2).sum()) / float(d**2) / 2
            err = diff / d
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return GPTQResult(codes, scales, zeros, perm, loss, path)


def _current_columns(w: torch.Tensor, block: torch.Tensor, errors: torch.Tensor, upper: torch.Tensor,
                     start: int, stop: int, i: int, end: int) -> torch.Tensor:
    """Columns [start + i, end) with every error so far applied (block columns are already up to date;
    later columns still miss this block's pending lazy update)."""
    inside = block[:, i: min(end, stop) - start]
    if end <= stop:
        return inside
    beyond = w[:, stop:end] - errors[:, :i] @ upper[start:start + i, stop:end]
    return torch.cat([inside, beyond], dim=1)


def _inverse_cholesky(h: torch.Tensor, damping: float, name: str) -> tuple[torch.Tensor, str]:
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹, i.e. (H_damped)⁻¹ = UᵀU."""
    white = whitening(h, damping, name)              # S·Sᵀ = H_damped, S⁻¹ known
    inverse = white.inverse.T @ white.inverse         # H_damped⁻¹ (also right for the eigh fallback)
    upper, info = torch.linalg.cholesky_ex((inverse + inverse.T) / 2, upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        raise NumericalError(f"{name}: Cholesky of the damped inverse Hessian failed "
                             f"(whitening path {white.path}); raise 'damping'")
    return upper, white.path


@register("gptq")
class GPTQ(QuantizingCompressor):
    Config = GPTQConfig
    config: GPTQConfig
    needs = frozenset({"gram"})

    @property
    def takes_target(self) -> bool:
        """Quantizes T with Hessian X̂ᵀX̂: with T = W* this is GPTAQ's asymmetric calibration."""
        return True

    def quantize_matrix(self, weight: torch.Tensor, gram: torch.Tensor | None, bias: torch.Tensor | None,
                        name: str) -> Quantized:
        c = self.config
        result = gptq_quantize(weight, gram, c.bits, c.group_size, c.scale_dtype, c.damping, c.block_size,
                               c.act_order, name)
        replacement = quantized_linear(result.codes, result.scales, result.zeros, c, bias, weight.dtype, result.perm)
        path = f"gptq[{result.path}]" + (", act-order" if c.act_order else "")
        return replacement, path, {"bits": c.bits, "group_size": replacement.group_size, "loss": result.loss}

    def quantize_rows(self, weight: torch.Tensor, hessians: Callable[[slice], torch.Tensor] | None,
                      name: str) -> Quantized:
        c = self.config
        if c.act_order:
            raise LrcompressError(f"{name}: act_order cannot apply to rows with their own Hessians; set act_order: false")
        result = gptq_rows(weight, hessians, c.bits, c.group_size, c.scale_dtype, c.damping, name)
        replacement = quantized_linear(result.codes, result.scales, result.zeros, c, None, weight.dtype)
        return replacement, f"gptq-rows[{result.path}]", {"bits": c.bits, "group_size": replacement.group_size,
                                                         "loss": result.loss}


def gptq_rows(weight: torch.Tensor, hessians: Callable[[slice], torch.Tensor], bits: int, group_size: int | None,
              scale_dtype: ScaleDtype, damping: float = 0.01, name: str = "", chunk: int = 256) -> GPTQResult:
    """GPTQ for a matrix whose every row has its own Hessian: ``hessians(rows)`` gives the (rows × k × k)
    Hessians of a slice of rows. A dictionary's values need it (output column j of S reads only the atoms
    of its support, so its Hessian is the support's block of DᵀGD, different for every j).

    Per row this is exactly :func:`gptq_quantize` without act-order (the same damping, grid fitting on
    the error-updated weights, loss); rows are processed ``chunk`` at a time, each chunk's columns in one
    batched sweep (no lazy blocks: a row of k values is short). A damping that fails Cholesky for any row
    of a chunk is raised ×10 for that chunk (recorded in the path)."""
    rows, k = weight.shape
    width = min(group_size or k, k)
    codes = torch.empty(rows, k, dtype=torch.int64, device=weight.device)
    scales = torch.empty(rows, math.ceil(k / width), dtype=torch.float64, device=weight.device)
    zeros = torch.empty_like(scales)
    loss, paths = 0.0, set()
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        w = weight[part].to(torch.float64).clone()
        h = hessians(part).to(device=w.device, dtype=torch.float64).clone()
        dead = torch.diagonal(h, dim1=1, dim2=2) == 0
        if bool(dead.any()):
            batch, column = dead.nonzero(as_tuple=True)
            h[batch, column, column] = 1.0
            w[dead] = 0.0
        upper, path = _batched_inverse_cholesky(h, damping, name)
        paths.add(path)
        scale = zero = None
        for i in range(k):
            if i % width == 0:
                scale, zero = fit_grid(w[:, i:min(i + width, k)], bits, scale_dtype)
                scales[part, i // width], zeros[part, i // width] = scale, zero
            q = quantize(w[:, i], scale, zero, bits)
            codes[part, i] = q
            err = (w[:, i] - dequantize(q, scale, zero)) / upper[:, i, i]
            loss += float((err**2).sum()) / 2
            w[:, i:] -= err[:, None] * upper[:, i, i:]
    return GPTQResult(codes, scales, zeros, None, loss, "/".join(sorted(paths)))


def _batched_inverse_cholesky(h: torch.Tensor, damping: float, name: str) -> tuple[torch.Tensor, str]:
    """Upper Cholesky factors U of (H_b + λ·mean(diag H_b)·I)⁻¹ for a batch of Hessians H_b."""
    identity = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    scale = torch.diagonal(h, dim1=1, dim2=2).mean(dim=1)[:, None, None]
    lam = damping
    for attempt in range(CHOLESKY_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + lam * scale * identity)
        if not bool(info.any()) and bool(torch.isfinite(lower).all()):
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex((inverse + inverse.transpose(1, 2)) / 2, upper=True)
            if not bool(info.any()) and bool(torch.isfinite(upper).all()):
                return upper, (f"cholesky(damping={lam:.0e})" if attempt == 0
                               else f"cholesky-raised(damping={lam:.0e})")
        lam *= DAMPING_GROWTH
    raise NumericalError(f"{name}: Cholesky of the per-row damped Hessians failed up to damping {lam:.0e}; "
                         "raise 'damping'")
