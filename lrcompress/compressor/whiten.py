"""``whiten``: activation-aware SVD as in SVD-LLM (Wang et al., 2024).

With G = XᵀX = S·Sᵀ, ‖X(W−Ŵ)ᵀ‖_F = ‖(W−Ŵ)·S‖_F, so the best rank-r Ŵ is the truncated SVD of W·S
mapped back by S⁻¹: Ŵ = U_r Σ_r V_rᵀ S⁻¹. S is the (damped) Cholesky factor, with the fallbacks of
``linalg.whitening``.

This is not ASVD (Yuan et al., 2023), which scales the input channels by a diagonal of activation
magnitudes and searches a rank per layer; an ``asvd`` alias of this method used to exist and was removed
because the name promised that other method.
"""
from __future__ import annotations

from typing import Mapping

from pydantic import Field
from torch import nn

from ..modules import LowRankLinear, dense_weight
from .base import CompressResult, GramShrinkageConfig, LowRankCompressor, LowRankConfig, register
from .linalg import GramMetric, balanced_factors, truncated_svd
from .stats import Statistic, gram_of


class WhitenConfig(LowRankConfig, GramShrinkageConfig):
    damping: float = Field(1e-4, ge=0.0, description="λ in G + λ·mean(diag G)·I before Cholesky")


@register("whiten")
class WhitenedSVD(LowRankCompressor):
    Config = WhitenConfig
    config: WhitenConfig
    needs = frozenset({"gram"})

    @property
    def takes_target(self) -> bool:
        """Rank-r truncation of T in the metric X̂ᵀX̂: exactly the best fit of any target T."""
        return True

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        gram_stat = gram_of(stats)
        weight = dense_weight(module).detach()
        rank = self.plan(module).rank
        white = GramMetric.of(self.config).whiten(gram_stat.gram(name), name)
        u, s, vh = truncated_svd(weight.to(white.factor) @ white.factor, rank)
        up, down = balanced_factors(u, s, vh)
        down = down @ white.inverse
        replacement = LowRankLinear.from_factors(up, down, getattr(module, "bias", None), weight.dtype)
        return CompressResult(replacement, rank=rank, numerical_path=white.path)
