"""``fwsvd``: Fisher-weighted SVD ("Language model compression with weighted low-rank
factorization", Hsu et al., ICLR 2022).

The importance of W_ij is its empirical Fisher I_ij = E_d[(∂L_d/∂W_ij)²]. FWSVD collapses it to one
weight per input feature, f_j = Σ_i I_ij (the paper sums over the dimension that is not shared with
the factorization's inner dimension; for a PyTorch ``Linear`` W is out × in, so that is the input
side), and solves min ‖(W − Ŵ)·D‖_F with D = diag(√f): the truncated SVD U_r Σ_r V_rᵀ of W·D gives
B = U_r Σ_r^½ and A = Σ_r^½ V_rᵀ D⁻¹.

Choices the paper leaves open, made here:

* ε is relative: d_j = √f_j + ε·mean(√f), then d is divided by its mean. A global scale of f then
  cancels exactly (as the method intends), ε only keeps features whose gradient is zero (unused
  modules, dead inputs) invertible, and uniform importances give D = I, i.e. exactly ``svd``.
  A module with no gradient at all (f ≡ 0) falls back to D = I, also exactly ``svd``.
* ``two_sided: true`` (off by default; a variant, not the paper's method) also weights the output
  rows with e_i = Σ_j I_ij: SVD of D_out·W·D_in, B = D_out⁻¹ U_r Σ_r^½. It minimizes
  ‖D_out (W − Ŵ) D_in‖_F, the best fit of that separable approximation of the full I weighting.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from ..modules import LowRankLinear, dense_weight
from .base import CompressResult, LowRankCompressor, LowRankConfig, register
from .fisher import FisherStatistic
from .linalg import balanced_factors
from .stats import Statistic

log = logging.getLogger(__name__)


class FWSVDConfig(LowRankConfig):
    epsilon: float = Field(1e-6, gt=0.0, description="floor added to √f, relative to mean(√f)")
    two_sided: bool = Field(False, description="variant: also weight output rows by their Fisher sums")


def importance_scale(sums: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, int]:
    """D's diagonal from Fisher sums (float64, mean 1) and how many entries had zero importance."""
    root = sums.to(torch.float64).clamp_min(0).sqrt()
    zeros = int((root == 0).sum())
    scale = root.mean()
    if scale <= 0:
        return torch.ones_like(root), zeros
    d = root + epsilon * scale
    return d / d.mean(), zeros


@register("fwsvd")
class FisherWeightedSVD(LowRankCompressor):
    Config = FWSVDConfig
    config: FWSVDConfig
    needs = frozenset({"fisher"})

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        fisher = stats["fisher"]
        assert isinstance(fisher, FisherStatistic)
        weight = dense_weight(module).detach()
        w = weight.to(torch.float64)
        rank = self.plan(module).rank
        d_in, zero_in = importance_scale(fisher.input_importance(name).to(w.device), self.config.epsilon)
        d_out, zero_out = torch.ones(w.shape[0], dtype=torch.float64, device=w.device), 0
        if self.config.two_sided:
            d_out, zero_out = importance_scale(fisher.output_importance(name).to(w.device), self.config.epsilon)
        if zero_in == d_in.numel():
            log.warning("%s: no Fisher information (no gradient reached it over %d windows); "
                        "fwsvd reduces to plain SVD", name, fisher.count)
        u, s, vh = torch.linalg.svd(d_out[:, None] * w * d_in, full_matrices=False)
        up, down = balanced_factors(u[:, :rank], s[:rank], vh[:rank])
        up, down = up / d_out[:, None], down / d_in
        replacement = LowRankLinear.from_factors(up, down, getattr(module, "bias", None), weight.dtype)
        energy = s.square()
        weighted_error = float((energy[rank:].sum() / energy.sum()).sqrt()) if energy.sum() > 0 else 0.0
        path = "svd(D_out·W·D_in)" if self.config.two_sided else "svd(W·D)"
        if zero_in or zero_out:
            path += f", ε floor on {zero_in} input / {zero_out} output features with zero Fisher"
        details = {"fisher_windows": fisher.count, "weighted_error": weighted_error,
                   "zero_fisher_inputs": zero_in, "input_scale_max": float(d_in.max()),
                   "input_scale_min": float(d_in.min())}
        return CompressResult(replacement, rank=rank, numerical_path=path, details=details)
