"""``svd``: plain truncated SVD of W, the data-free baseline (Eckart–Young in weight space)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..modules import LowRankLinear, dense_weight
from .base import CompressResult, LowRankCompressor, register
from .stats import Statistic


@register("svd")
class PlainSVD(LowRankCompressor):
    needs = frozenset()

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        weight = dense_weight(module).detach()
        rank = self.plan(module).rank
        u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
        root = s[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
        replacement = LowRankLinear.from_factors(up, down, getattr(module, "bias", None), weight.dtype)
        return CompressResult(replacement, rank=rank, numerical_path="svd")
