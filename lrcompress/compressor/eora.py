"""``eora``: EoRA, training-free compensation in the eigenspace of the input activations.

Liu et al., 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation". A module whose weight W was compressed to W_c by an earlier stage gets a residual
path: y = x·W_cᵀ + (x·Aᵀ)·Bᵀ. With the calibration second moment G = XᵀX/N = QΛQᵀ (eigh, float64)
and ΔW = W − W_c:

    SVD of ΔW·Q·Λ^½ = UΣVᵀ, keep rank r,   B = U_r Σ_r^½,   A = Σ_r^½ V_rᵀ Λ^-½ Qᵀ.

B·A is then the best rank-r approximation of ΔW in the output-error norm ‖X(ΔW − BA)ᵀ‖_F (on the
span of the calibration inputs). Eigenvalues at or below λ_max·n·eps (zero or negative ones from
round-off) are clamped: Λ^½ and Λ^-½ are set to 0 there, so those directions get no correction
instead of an exploding one. G is normalized by the token count so that the factors' magnitudes do
not depend on the calibration size (it matters when A and B are quantized). Choices:

* ``space: weight`` is the baseline compensation of the paper: the plain truncated SVD of ΔW;
* ``bits``: A and B are quantized with round-to-nearest (the paper quantizes them to 4 bits), each
  along its input dimension in groups of ``group_size``; the quantized factors count in the record and
  in the plan's bytes. ``quantizer: gptq`` quantizes them with GPTQ instead, A with the input Gram and B
  with the Gram of A_q's outputs, A_q·G·A_qᵀ, as ``gptq`` with ``apply_to: factors`` does for a low-rank
  pair (``factors``, docs/quantized-factors.md).

W comes from the pipeline's ``original_weight`` snapshot (the module before the run's first stage),
W_c from the module this stage receives; the base module is kept as it is inside the result.
"""
from __future__ import annotations

import logging
from typing import Literal, Mapping

import torch
from pydantic import Field
from torch import nn

from ..errors import LrcompressError
from ..modules import CompensatedLinear, LowRankLinear, dense_weight, storage_bytes, stored_params
from .base import CompressResult, Compressor, CompressorConfig, Plan, register
from .factors import factor_spec, planned, quantize_factors
from .linalg import balanced_factors, truncated_svd
from .quantgrid import QuantConfig, ScaleDtype, quantized_linear, round_to_nearest
from .stats import OriginalWeight, Statistic, gram_of

log = logging.getLogger(__name__)


class EoRAConfig(CompressorConfig):
    rank: int = Field(ge=1, description="rank r of the residual path B·A")
    space: Literal["eigen", "weight"] = Field(
        "eigen", description="eigen: EoRA (activation eigenspace); weight: plain SVD of ΔW (baseline)")
    bits: int | None = Field(None, ge=2, le=8, description="quantize A and B to this many bits (null: keep float)")
    group_size: int | None = Field(128, ge=1, description="group size of the factor quantization")
    scale_dtype: ScaleDtype = "float16"
    quantizer: Literal["rtn", "gptq"] = Field(
        "rtn", description="how ``bits`` quantizes A and B: rtn (the paper) or gptq with each factor's own Hessian")

    def rank_for(self, out_features: int, in_features: int) -> int:
        return min(self.rank, out_features, in_features)


def eigenspace_factors(delta: torch.Tensor, second_moment: torch.Tensor,
                       rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """B (out × r), A (r × in) minimizing ‖X(ΔW − BA)ᵀ‖ with XᵀX ∝ ``second_moment``; and the number
    of clamped eigenvalues. All float64."""
    g = second_moment.to(torch.float64)
    evals, evecs = torch.linalg.eigh((g + g.T) / 2)
    floor = max(evals.max().item(), 0.0) * g.shape[0] * torch.finfo(torch.float64).eps
    kept = evals > floor
    safe = torch.where(kept, evals, torch.ones_like(evals))
    root = torch.where(kept, safe.sqrt(), torch.zeros_like(evals))
    inverse_root = torch.where(kept, safe.rsqrt(), torch.zeros_like(evals))
    u, s, vh = truncated_svd(delta.to(torch.float64) @ (evecs * root), rank)
    up, down = balanced_factors(u, s, vh)
    down = (down * inverse_root) @ evecs.T
    return up, down, int((~kept).sum())


def weight_space_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = truncated_svd(delta.to(torch.float64), rank)
    return balanced_factors(u, s, vh)


def factor_module(factor: torch.Tensor, config: EoRAConfig, dtype: torch.dtype) -> nn.Module:
    """``factor`` (out × in) as an ``nn.Linear`` without bias, or RTN-quantized."""
    if config.bits is None:
        linear = nn.Linear(factor.shape[1], factor.shape[0], bias=False, dtype=dtype, device=factor.device)
        with torch.no_grad():
            linear.weight.copy_(factor.to(dtype))
        return linear
    grid = QuantConfig(bits=config.bits, group_size=config.group_size, scale_dtype=config.scale_dtype)
    codes, scales, zeros = round_to_nearest(factor, grid)
    return quantized_linear(codes, scales, zeros, grid, None, dtype)


@register("eora")
class EoRA(Compressor):
    Config = EoRAConfig
    config: EoRAConfig
    needs = frozenset({"gram", "original_weight"})

    @property
    def takes_target(self) -> bool:
        """The residual T − W_c in the eigenspace of X̂ᵀX̂; ``space: weight`` is data-free."""
        return self.config.space == "eigen"

    def plan(self, module: nn.Module) -> Plan:
        """Adds the factors to whatever the module stores: rank·(m + n) values, at their packed bytes with ``bits``."""
        m, n = module.out_features, module.in_features
        rank = self.config.rank_for(m, n)
        params = stored_params(module) + rank * (m + n)
        if self.config.bits is None:
            return Plan(params, rank)
        pair = {"kind": LowRankLinear.kind, "in_features": n, "out_features": m, "rank": rank, "bias": False}
        factors = planned(factor_spec("eora", pair, self._grid(), self.name), dense_weight(module).dtype)
        return Plan(params, rank, bytes_after=storage_bytes(module) + factors.bytes_after)

    def _grid(self) -> QuantConfig:
        """The grid of the quantized factors (a GPTQ config when ``quantizer: gptq``; same grid, same bytes)."""
        c = self.config
        if c.quantizer == "gptq":
            from .gptq import GPTQConfig
            return GPTQConfig(bits=c.bits, group_size=c.group_size, scale_dtype=c.scale_dtype, apply_to="factors")
        return QuantConfig(bits=c.bits, group_size=c.group_size, scale_dtype=c.scale_dtype, apply_to="factors")

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        original = stats.get("original_weight")
        if not isinstance(original, OriginalWeight):
            raise KeyError("eora needs the 'original_weight' snapshot statistic")
        gram_stat = gram_of(stats)
        current = dense_weight(module).detach()
        delta = original.weight.to(device=current.device, dtype=torch.float64) - current.to(torch.float64)
        if not bool(delta.any()):
            raise LrcompressError(f"{name}: eora found W_c = W (no earlier stage compressed this module); "
                                  "place eora after a compression stage with the same targets")
        rank = self.config.rank_for(*current.shape)
        if self.config.space == "eigen":
            second_moment = gram_stat.gram(name).to(current.device) / max(gram_stat.count, 1)
            up, down, clamped = eigenspace_factors(delta, second_moment, rank)
            path = f"eigh({clamped} of {current.shape[1]} eigenvalues clamped) + svd"
            if clamped:
                log.info("%s: %d eigenvalues at or below λ_max·n·eps get no correction", name, clamped)
        else:
            up, down = weight_space_factors(delta, rank)
            path = "svd(ΔW)"
        dtype = current.dtype
        if self.config.bits is not None and self.config.quantizer == "gptq":
            from .gptq import GPTQ
            pair = LowRankLinear.from_factors(up, down, None, dtype)
            quantized = quantize_factors(GPTQ(self._grid()), name, pair, gram_stat.gram(name)).module
            down_module, up_module = quantized.down, quantized.up
            path += f", factors gptq {self.config.bits}-bit"
        else:
            down_module, up_module = factor_module(down, self.config, dtype), factor_module(up, self.config, dtype)
            if self.config.bits is not None:
                path += f", factors rtn {self.config.bits}-bit"
        replacement = CompensatedLinear(module, down_module, up_module)
        return CompressResult(replacement, rank=rank, numerical_path=path,
                              details={"space": self.config.space, "base_kind": type(module).__name__})
