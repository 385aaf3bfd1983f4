"""``prune``: magnitude or Wanda pruning, unstructured or N:M (e.g. 2:4), with real sparse storage.

Scores (one per weight):
  * ``magnitude``: |W_ij|;
  * ``wanda`` (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"): |W_ij|·‖X_j‖₂,
    the input feature norm over every calibration token, ‖X_j‖₂ = sqrt(G_jj) from the Gram.
Which weights compete:
  * N:M: the M consecutive inputs of a row, N kept (both scores);
  * unstructured: ``comparison: row`` (each output row loses the same fraction; Wanda's choice,
    its default) or ``matrix`` (one threshold for the whole matrix; the classic layer-wise magnitude
    pruning, the default of ``magnitude``).
Ties are broken by position (stable sort), so the result is deterministic and the kept count exact.
The weights are not updated (neither method does); the result is stored as values + bitmask
(unstructured) or values + N:M indices.
"""
from __future__ import annotations

import math
import re
from typing import Literal, Mapping

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..modules import MaskedSparseLinear, NMSparseLinear, dense_weight
from .base import CompressorConfig, CompressResult, Compressor, Plan, register
from .stats import Statistic, gram_of


class PruneConfig(CompressorConfig):
    scoring: Literal["magnitude", "wanda"] = "wanda"
    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of weights removed (unstructured)")
    pattern: str | None = Field(None, description="N:M semi-structured pattern, e.g. '2:4'")
    comparison: Literal["row", "matrix"] | None = Field(
        None, description="unstructured only: who competes (default: row for wanda, matrix for magnitude)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.fullmatch(r"(\d+):(\d+)", value.strip())
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"pattern must be 'N:M' with 0 < N < M, got {value!r}")
        return f"{int(match[1])}:{int(match[2])}"

    @model_validator(mode="after")
    def _one_kind(self) -> "PruneConfig":
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of 'sparsity' (unstructured) or 'pattern' (N:M)")
        if self.pattern is not None and self.comparison is not None:
            raise ValueError("'comparison' applies to unstructured sparsity only")
        return self

    def n_m(self) -> tuple[int, int]:
        n, m = self.pattern.split(":")  # type: ignore[union-attr]
        return int(n), int(m)

    def competition(self) -> str:
        """Who competes for the kept places in unstructured mode."""
        return self.comparison or ("row" if self.scoring == "wanda" else "matrix")

    def kept(self, out_features: int, in_features: int) -> int:
        """Exact number of weights kept in an out × in matrix."""
        if self.pattern is not None:
            n, m = self.n_m()
            return out_features * (in_features // m) * n
        if self.competition() == "row":
            return out_features * (in_features - math.floor(self.sparsity * in_features))
        return out_features * in_features - math.floor(self.sparsity * out_features * in_features)


def scores(weight: torch.Tensor, scoring: str, gram: torch.Tensor | None) -> torch.Tensor:
    """Importance of each weight (float64, out × in)."""
    magnitude = weight.to(torch.float64).abs()
    if scoring == "magnitude":
        return magnitude
    assert gram is not None
    feature_norm = torch.diagonal(gram).clamp_min(0).sqrt().to(magnitude)
    return magnitude * feature_norm[None, :]


def top_k_mask(score: torch.Tensor, keep: int, dim: int = -1) -> torch.Tensor:
    """Bool mask keeping the ``keep`` highest scores along ``dim`` (ties: earliest position wins)."""
    order = torch.sort(score, dim=dim, descending=True, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(dim, order.narrow(dim, 0, keep), True)


def prune_mask(score: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    out_features, in_features = score.shape
    if config.pattern is not None:
        n, m = config.n_m()
        if in_features % m:
            raise ValueError(f"{n}:{m} pruning needs in_features divisible by {m}, got {in_features}")
        grouped = score.view(out_features, in_features // m, m)
        return top_k_mask(grouped, n).view(out_features, in_features)
    keep = config.kept(out_features, in_features)
    if config.competition() == "row":
        return top_k_mask(score, keep // out_features)
    return top_k_mask(score.reshape(-1), keep).view(out_features, in_features)


@register("prune")
class Prune(Compressor):
    Config = PruneConfig
    config: PruneConfig
    needs = frozenset({"gram"})

    def plan(self, module: nn.Module) -> Plan:
        bias = getattr(module, "bias", None)
        kept = self.config.kept(module.out_features, module.in_features)
        return Plan(kept + (bias.numel() if bias is not None else 0))

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        weight = dense_weight(module).detach()
        gram = None
        if self.config.scoring == "wanda":
            gram = gram_of(stats).gram(name).to(weight.device)
        keep = prune_mask(scores(weight, self.config.scoring, gram), self.config)
        bias = getattr(module, "bias", None)
        if self.config.pattern is not None:
            n, m = self.config.n_m()
            replacement = NMSparseLinear.from_dense(weight, keep, n, m, bias, weight.dtype)
            layout = f"{n}:{m}"
        else:
            replacement = MaskedSparseLinear.from_dense(weight, keep, bias, weight.dtype)
            layout = "unstructured"
        density = float(keep.sum()) / keep.numel()
        return CompressResult(replacement, numerical_path=f"{self.config.scoring} {layout}",
                              details={"density": density})
