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

Sub-MoE† (``submoe`` with ``rank`` or ``ratio``): step 3 runs on weights whitened by each member's
routed-token Gram and is truncated to rank r, and the merged experts are stored as low-rank pairs in a
``LowRankExperts`` module (see ``expert_merge.union_svd_factors`` for the choices); every expert,
singleton clusters included, becomes rank r. Such a checkpoint loads with ``lrcompress.load``.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import LrcompressError, NumericalError
from ..models.moe import (ExpertWeights, expert_activation, expert_count, expert_weights, rebuild_block, router,
                          router_tensors)
from ..modules.experts import LowRankExperts, activation_name
from .base import CompressorConfig, Plan, register
from .block import INPUT_SAMPLE, BlockCompressor, BlockResult
from .expert_merge import (average_merge, cluster_experts, merge_rows, merge_weights, most_frequent,
                           union_svd_factors, union_svd_merge)
from .expert_stats import EXPERT_GRAMS, EXPERT_STATS, ExpertGramStatistic, ExpertStatistic
from .linalg import Whitening, balanced_factors, low_rank_params, target_rank, whitening
from .stats import Statistic

log = logging.getLogger(__name__)


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
    """Sub-MoE options; ``rank`` or ``ratio`` turns on Sub-MoE† (whitened, low-rank merged experts)."""

    subspace_rank: int | None = Field(
        None, ge=1, description="keep only this many singular triplets of the shared subspace (the merged "
                                "weights stay dense); none: full rank")
    rank: int | None = Field(None, ge=1, description="Sub-MoE†: rank of every merged expert weight "
                                                     "(capped at min(out, in))")
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Sub-MoE†: fraction of each merged expert "
                                                                 "weight's parameters removed (rank from it)")
    damping: float = Field(1e-4, ge=0.0, description="Sub-MoE†: λ in G + λ·mean(diag G)·I before Cholesky")

    @model_validator(mode="after")
    def _one_intra_size(self) -> "SubMoEConfig":
        if self.rank is not None and self.ratio is not None:
            raise ValueError("give at most one of 'rank' or 'ratio' (the intra-expert size of Sub-MoE†)")
        if self.subspace_rank is not None and self.low_rank:
            raise ValueError("'subspace_rank' (dense truncation) and 'rank'/'ratio' (Sub-MoE†, low-rank "
                             "experts) are two truncations of the same subspace: give one")
        return self

    @property
    def low_rank(self) -> bool:
        return self.rank is not None or self.ratio is not None

    def rank_for(self, out_features: int, in_features: int) -> int:
        """Rank of a merged (out × in) expert weight: ``rank`` capped at min(out, in), or the ratio's rank."""
        return target_rank(out_features, in_features, self.rank, self.ratio)


@dataclass
class MergedExperts:
    """The merged experts of a block: dense weights or a replacement experts module, and how."""

    experts: ExpertWeights | nn.Module
    numerical_path: str = "float64"
    rank: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


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

    def merged_rank(self, module: nn.Module) -> int | None:
        """Rank of every merged expert weight; None: the merged experts are dense."""
        return None

    def merged_expert_params(self, module: nn.Module) -> int:
        """Stored weights of one merged expert: dense like an original expert, or three rank-r pairs."""
        rank = self.merged_rank(module)
        shapes = [t.shape[1:] for t in expert_weights(module).types().values()]
        if rank is None:
            return sum(out * inp for out, inp in shapes)
        return sum(low_rank_params(out, inp, rank) for out, inp in shapes)

    def plan(self, module: nn.Module) -> Plan:
        experts = expert_count(module)
        kept = self.config.kept(experts)
        per_expert = sum(t[0].numel() for t in expert_weights(module).types().values())
        parameters = dict(router(module).named_parameters(recurse=False))   # buffers are not parameters
        per_router = sum(t[0].numel() for key, t in router_tensors(module).items() if key in parameters)
        total = sum(p.numel() for p in module.parameters())
        after = kept * (self.merged_expert_params(module) + per_router)
        return Plan(total - experts * (per_expert + per_router) + after, rank=self.merged_rank(module))

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> BlockResult:
        statistic = stats[EXPERT_STATS]
        assert isinstance(statistic, ExpertStatistic)
        kept = self.config.kept(expert_count(module))
        frequencies = statistic.frequencies()
        similarity = statistic.similarity(name)
        groups = self.groups(frequencies, similarity, kept)
        mix = [merge_weights(frequencies, members) for members in groups]
        merged = self.merge_experts(name, module, groups, mix, stats)
        rows_by_name = {key: merge_rows(rows, groups, mix) for key, rows in router_tensors(module).items()}
        block = rebuild_block(module, merged.experts, rows_by_name)
        details = {"experts_before": expert_count(module), "experts_after": kept, "groups": groups,
                   "frequencies": [round(float(f), 6) for f in frequencies],
                   "merge_weights": [[round(float(v), 6) for v in w] for w in mix], **merged.details}
        return BlockResult(block, rank=merged.rank, numerical_path=merged.numerical_path, details=details,
                           config_updates={"num_experts": kept})

    def merge_experts(self, name: str, module: nn.Module, groups: list[list[int]], mix: list[torch.Tensor],
                      stats: Mapping[str, Statistic]) -> MergedExperts:
        """Dense merged weights, one ``merge`` per cluster and weight type."""
        original = expert_weights(module)
        return MergedExperts(ExpertWeights(**{
            kind: torch.stack([self._merge_group(tensor, members, w) for members, w in zip(groups, mix)])
            for kind, tensor in original.types().items()}))

    def _merge_group(self, tensor: torch.Tensor, members: list[int], w: torch.Tensor) -> torch.Tensor:
        if len(members) == 1:
            return tensor[members[0]].to(torch.float64)        # a 1-expert cluster is kept exactly
        return self.merge(tensor[members], w)


@register("submoe")
class SubMoE(ExpertReducer):
    """Sub-MoE: output-similarity clusters merged in a shared subspace (union SVD); with ``rank`` or
    ``ratio``, Sub-MoE†: the union SVD of routed-token-whitened weights, low-rank merged experts."""

    Config = SubMoEConfig
    config: SubMoEConfig

    @property
    def needs(self) -> frozenset[str]:       # type: ignore[override]
        return ExpertReducer.needs | ({EXPERT_GRAMS} if self.config.low_rank else set())

    def merge(self, weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return union_svd_merge(weights, w, self.config.subspace_rank)

    def merged_rank(self, module: nn.Module) -> int | None:
        if not self.config.low_rank:
            return None
        ranks = {self.config.rank_for(*t.shape[1:]) for t in expert_weights(module).types().values()}
        assert len(ranks) == 1, ranks     # (I × hidden) and (hidden × I): the formulas are symmetric
        return ranks.pop()

    def merge_experts(self, name: str, module: nn.Module, groups: list[list[int]], mix: list[torch.Tensor],
                      stats: Mapping[str, Statistic]) -> MergedExperts:
        rank = self.merged_rank(module)
        if rank is None:
            return super().merge_experts(name, module, groups, mix, stats)
        grams = stats[EXPERT_GRAMS]
        assert isinstance(grams, ExpertGramStatistic)
        original = expert_weights(module)
        paths: Counter[str] = Counter()
        factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {k: ([], []) for k in original.types()}
        for members, w in zip(groups, mix):
            members, w = _reached(members, w, grams.counts)
            whites = [self._whitenings(name, grams, member) for member in members]
            for kind, tensor in original.types().items():
                chosen = [white[kind] for white in whites]
                paths.update(white.path for white in chosen)
                b, a = balanced_factors(*union_svd_factors(tensor[members], w, rank, chosen))
                factors[kind][0].append(b)
                factors[kind][1].append(a)
        stacked = {kind: (torch.stack(bs), torch.stack(as_)) for kind, (bs, as_) in factors.items()}
        if not all(torch.isfinite(t).all() for pair in stacked.values() for t in pair):
            raise NumericalError(f"{name}: the low-rank merged expert factors contain NaN/Inf")
        dtype = original.gate.dtype
        experts = LowRankExperts.from_factors(stacked, activation_name(expert_activation(module)), dtype)
        summary = ", ".join(f"{path}×{count}" for path, count in sorted(paths.items()))
        log.info("%s: Sub-MoE† whitening paths: %s", name, summary)
        return MergedExperts(experts, numerical_path=f"float64; whitening {summary}", rank=rank,
                             details={"rank": rank, "routed_tokens": grams.counts.tolist()})

    def _whitenings(self, name: str, grams: ExpertGramStatistic, member: int) -> dict[str, Whitening]:
        """One damped factor per distinct Gram of the member (gate and up share their input's)."""
        by_kind = grams.grams(name, member)
        inputs = whitening(by_kind["gate"], self.config.damping, f"{name}.experts[{member}].gate_up")
        down = whitening(by_kind["down"], self.config.damping, f"{name}.experts[{member}].down")
        return {"gate": inputs, "up": inputs, "down": down}


def _reached(members: list[int], w: torch.Tensor, counts: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The members some calibration token was routed to, with their merge weights renormalized.

    A member no token reached has merge weight 0 (its frequency is 0) and zero routed-token error
    whatever its approximation, so it is left out of the whitened union SVD rather than spending rank
    on it. When no member was reached, all are kept: their Grams are empty, ``whitening`` returns the
    identity (logged) and the cluster gets the plain union SVD with uniform weights.
    """
    keep = [i for i, m in enumerate(members) if int(counts[m]) > 0]
    if not keep or len(keep) == len(members):
        return members, w
    kept_w = w[keep]
    total = float(kept_w.sum())
    kept_w = kept_w / total if total > 0 else torch.full_like(kept_w, 1.0 / len(keep))
    return [members[i] for i in keep], kept_w


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
