"""Expert reduction for MoE blocks: ``submoe`` (Sub-MoE, Li et al. 2025) and two baselines in the
same code path, ``expert_prune`` (keep the most routed-to experts) and ``expert_average``
(frequency-weighted averaging of each cluster's weights, M-SMoE style).

Each turns a block with E routed experts into one with E' experts, same architecture, so that the
model stays a plain checkpoint with a smaller expert count in its config:

1. routing frequencies f_i and the mean cosine similarity of expert outputs (``expert_outputs``);
2. grouping: K-means (k-means++, seeded) on the similarity rows into E' clusters (submoe, average),
   or the E' most frequent experts as singleton groups (prune);
3. merging per weight type (gate, up, down): union SVD with a shared U Σ and frequency-merged V
   blocks (submoe) or the frequency-weighted average (average);
4. router: each merged expert's router row (and per-expert router buffers such as DeepSeek-V3's score
   correction bias) is the frequency-weighted mean of its members' rows, with the same weights w_i
   as the expert merge. Rationale: the merged expert stands for its members in proportion to how
   often each was used, so its logit should be the logit of the typical member token; for a 1-expert
   cluster it is exactly the old row, and pruning keeps the kept experts' rows unchanged (the softmax
   renormalizes over the remaining experts). Shared experts are never touched.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import LrcompressError
from ..models.moe import ExpertWeights, expert_count, expert_weights, rebuild_block, router_tensors
from .base import CompressorConfig, Plan, register
from .block import INPUT_SAMPLE, BlockCompressor, BlockResult
from .expert_merge import (average_merge, cluster_experts, merge_rows, merge_weights, most_frequent,
                           union_svd_merge)
from .expert_stats import EXPERT_STATS, ExpertStatistic
from .stats import Statistic


class ExpertReductionConfig(CompressorConfig):
    """How many experts every MoE block keeps: ``num_experts`` (E'), or ``expert_ratio`` (fraction of
    the experts removed, like ``ratio`` everywhere: E' = round((1 − expert_ratio)·E))."""

    num_experts: int | None = Field(None, ge=1, description="experts kept per MoE block (E')")
    expert_ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of the experts removed")
    seed: int = Field(0, description="seed of the k-means++ initialization")

    @model_validator(mode="after")
    def _one_size(self) -> "ExpertReductionConfig":
        if (self.num_experts is None) == (self.expert_ratio is None):
            raise ValueError("give exactly one of 'num_experts' or 'expert_ratio'")
        return self

    def kept(self, experts: int) -> int:
        if self.num_experts is not None:
            kept = self.num_experts
        else:
            kept = max(1, round((1.0 - (self.expert_ratio or 0.0)) * experts))
        if kept >= experts:
            raise LrcompressError(f"keeping {kept} of {experts} experts is no reduction")
        return kept


class SubMoEConfig(ExpertReductionConfig):
    subspace_rank: int | None = Field(
        None, ge=1, description="keep only this many singular triplets of the shared subspace (the merged "
                                "weights stay dense); none: full rank")


class ExpertReducer(BlockCompressor):
    """Shared path: statistics -> groups -> merged weights and router rows -> rebuilt block."""

    block_kind = "moe"
    needs: ClassVar[frozenset[str]] = frozenset({EXPERT_STATS})
    Config = ExpertReductionConfig
    config: ExpertReductionConfig

    def groups(self, frequencies: torch.Tensor, similarity: torch.Tensor, kept: int) -> list[list[int]]:
        """Members of each merged expert (default: output-similarity clusters)."""
        return cluster_experts(similarity, kept, self.config.seed)

    def merge(self, weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One weight type of one cluster (n × out × in) -> the merged weight (out × in)."""
        raise NotImplementedError

    def plan(self, module: nn.Module) -> Plan:
        experts = expert_count(module)
        kept = self.config.kept(experts)
        per_expert = sum(t[0].numel() for t in expert_weights(module).types().values())
        parameters = dict(module.gate.named_parameters(recurse=False))   # buffers are not parameters
        per_expert += sum(t[0].numel() for key, t in router_tensors(module).items() if key in parameters)
        total = sum(p.numel() for p in module.parameters())
        return Plan(total - (experts - kept) * per_expert)

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> BlockResult:
        statistic = stats[EXPERT_STATS]
        assert isinstance(statistic, ExpertStatistic)
        kept = self.config.kept(expert_count(module))
        frequencies = statistic.frequencies()
        similarity = statistic.similarity(name)
        groups = self.groups(frequencies, similarity, kept)
        mix = [merge_weights(frequencies, members) for members in groups]
        original = expert_weights(module)
        merged = ExpertWeights(**{
            kind: torch.stack([self._merge_group(tensor, members, w) for members, w in zip(groups, mix)])
            for kind, tensor in original.types().items()})
        router = {key: merge_rows(rows, groups, mix) for key, rows in router_tensors(module).items()}
        block = rebuild_block(module, merged, router)
        details = {"experts_before": len(original), "experts_after": kept, "groups": groups,
                   "frequencies": [round(float(f), 6) for f in frequencies],
                   "merge_weights": [[round(float(v), 6) for v in w] for w in mix]}
        return BlockResult(block, numerical_path="float64", details=details,
                           config_updates={"num_experts": kept})

    def _merge_group(self, tensor: torch.Tensor, members: list[int], w: torch.Tensor) -> torch.Tensor:
        if len(members) == 1:
            return tensor[members[0]].to(torch.float64)        # a 1-expert cluster is kept exactly
        return self.merge(tensor[members], w)


@register("submoe")
class SubMoE(ExpertReducer):
    """Sub-MoE: output-similarity clusters merged in a shared subspace (union SVD)."""

    Config = SubMoEConfig
    config: SubMoEConfig

    def merge(self, weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return union_svd_merge(weights, w, self.config.subspace_rank)


@register("expert_average")
class ExpertAverage(ExpertReducer):
    """Baseline: the same clusters, frequency-weighted average of the weights (M-SMoE style)."""

    def merge(self, weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return average_merge(weights, w)


@register("expert_prune")
class ExpertPrune(ExpertReducer):
    """Baseline: keep the E' most frequently routed-to experts unchanged, drop the others."""

    def groups(self, frequencies: torch.Tensor, similarity: torch.Tensor, kept: int) -> list[list[int]]:
        return [[i] for i in most_frequent(frequencies, kept)]


__all__ = ["ExpertAverage", "ExpertPrune", "ExpertReducer", "SubMoE", "INPUT_SAMPLE"]
