"""``lord``: LoRD, one-shot feature-based low-rank decomposition.

"Features are low-rank, but weights are not" (Yu & Wu, 2023): the outputs y = Wx live near a low-
dimensional subspace even when W is full rank. Take the top-r eigenvectors U of the output second
moment E[yyᵀ] = W·G·Wᵀ (G = XᵀX), and project: Ŵ = U·(UᵀW), i.e. B = U and A = UᵀW. The bias is
kept as it is. Only an m×m eigendecomposition, no Cholesky: robust to singular Grams.

``center: true`` uses the output covariance instead (inputs centered with their calibration mean)
and moves the projected-out mean into the bias: b' = b + (I − UUᵀ)·W·μ. The paper's formulation is
the uncentered one (the default), which is what DESIGN.md specifies.
"""
from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from ..modules import LowRankLinear, dense_weight
from .base import CompressResult, GramShrinkageConfig, LowRankCompressor, LowRankConfig, register
from .linalg import shrink_gram
from .stats import Statistic, gram_of


class LoRDConfig(LowRankConfig, GramShrinkageConfig):
    center: bool = Field(False, description="use the output covariance and fold the mean into the bias")


@register("lord")
class LoRD(LowRankCompressor):
    Config = LoRDConfig
    config: LoRDConfig
    needs = frozenset({"gram"})

    @property
    def takes_target(self) -> bool:
        """Top-r eigenvectors of T·X̂ᵀX̂·Tᵀ: the best projection of any target T's outputs."""
        return True

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        gram_stat = gram_of(stats)
        weight = dense_weight(module).detach()
        w = weight.to(torch.float64)
        gram = shrink_gram(gram_stat.gram(name).to(w.device), self.config.shrinkage)
        count = max(gram_stat.count, 1)
        second_moment = gram / count
        bias = getattr(module, "bias", None)
        new_bias = None if bias is None else bias.detach().to(torch.float64)
        if self.config.center:
            mu = gram_stat.mean().to(w.device)
            second_moment = second_moment - torch.outer(mu, mu)
        output_moment = w @ second_moment @ w.T
        evals, evecs = torch.linalg.eigh((output_moment + output_moment.T) / 2)
        rank = self.plan(module).rank
        u = evecs[:, torch.argsort(evals, descending=True)[:rank]]
        down = u.T @ w
        if self.config.center:
            residual_mean = w @ mu - u @ (down @ mu)
            new_bias = residual_mean if new_bias is None else new_bias + residual_mean
        replacement = LowRankLinear.from_factors(u, down, new_bias, weight.dtype)
        path = "eigh(output moment)" + (", centered" if self.config.center else "")
        return CompressResult(replacement, rank=rank, numerical_path=path)
