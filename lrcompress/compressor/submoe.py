"""Expert reduction for MoE blocks: ``submoe`` (Sub-MoE, Li et al. 2025, arXiv 2506.23266) and the
baselines in the same code path, ``expert_prune`` (keep the most routed-to experts, or the highest
REAP scores) and ``expert_average`` (frequency-weighted averaging of each cluster's weights, M-SMoE
style; with ``clustering: hierarchical`` HC-SMoE style).

Each turns a block with E routed experts into one with E' experts, same architecture, so that the
model stays a plain checkpoint with a smaller expert count in its config:

1. routing frequencies f_i and the mean cosine similarity of expert outputs (``expert_outputs``);
2. grouping: K-means (k-means++, seeded) on the similarity rows into E' clusters (submoe, average),
   or average-linkage hierarchical clustering on 1 − similarity (``clustering: hierarchical``), or the
   E' most frequent / highest-REAP-score experts as singleton groups (prune); or, for the merges, the
   groups the user fixes with ``expert_groups`` (below);
3. merging per weight type (gate, up, down): union SVD with a shared, truncated U Σ and
   frequency-merged V blocks (submoe, the paper's merge), RegMean's Gram-weighted least squares
   (submoe ``merge: regmean``) or the frequency-weighted average (average);
4. router: each merged expert's router row (and per-expert router buffers such as DeepSeek-V3's score
   correction bias) is the frequency-weighted mean of its members' rows, with the same weights w_i
   as the expert merge. Rationale: the merged expert stands for its members in proportion to how
   often each was used, so its logit should be the logit of the typical member token; for a 1-expert
   cluster it is exactly the old row, and pruning keeps the kept experts' rows unchanged (the softmax
   renormalizes over the remaining experts). Shared experts are never touched.

Fixed groups (``expert_groups: [[0, 1], [2, 3], ...]``, submoe and expert_average; E' = the number of
groups): why: a user may know which experts belong together better than output similarity on a
calibration sample does, e.g. the experts of a Branch-Train-MiX MoE grown from one dense model per
domain, two per family; and issue 32 needs the oracle comparison, "does the merge beat averaging within
the right clusters", which no clustering found on its fixture. The groups must be a partition of
0..E−1 (every expert once) and every targeted block must have E experts (else an error naming the
block); they replace ``clustering``, and expert_prune refuses them (it merges nothing).

The paper truncates the union SVD but leaves its rank open; the default here is the rank of one
expert weight, r = min(out, in): the merged expert is one expert, so its shared basis keeps as many
directions as a single expert weight can span, and the union's remaining directions (present only
because the members differ) are dropped. ``subspace_rank`` or ``subspace_energy`` (fraction of Σσ²
kept) choose another rank; ``subspace_budget`` keeps a fraction of all blocks' min(out, in) triplets, the
same fraction everywhere or, with ``rank_allocation: layers``, shared across the MoE layers by their
experts' spectra (``allocate_layer_ranks``; Sub-MoE†'s rank budget can be shared the same way). Measured on
a synthetic MoE in ``bench/submoe_rank.py``: no truncation below min(out, in) kept the block output better.
Where the union already has rank ≤ min(out, in) (a weight with out ≤ in,
such as a down projection), the default truncates nothing and that weight type is merged as the
frequency-weighted average; the others (out > in: gate and up when I > hidden, down when I < hidden)
are truncated. What the truncation takes from the average is recorded per cluster
(``share_of_average_removed``) and, at the default rank, logged above 1%: ≈ 0.05% on experts fine-tuned apart, ≈ 5% on
Drop-Upcycled experts that differ in which neurons they use, where it doubled web and book perplexity
(bench/history/issue32-submoe.md).

Sub-MoE† (``submoe`` with ``rank`` or ``ratio``): step 3 runs on weights whitened by each member's
routed-token Gram and is truncated to rank r, and the merged experts are stored as low-rank pairs in a
``LowRankExperts`` module (see ``expert_merge.union_svd_factors`` for the choices); every expert,
singleton clusters included, becomes rank r. Such a checkpoint loads with ``lrcompress.load``.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import LrcompressError, NumericalError
from ..models.moe import (ExpertWeights, expert_activation, expert_count, expert_weights, rebuild_block, router,
                          router_tensors)
from ..modules.experts import LowRankExperts, activation_name
from .base import CompressorConfig, Plan, register
from .block import INPUT_SAMPLE, BlockCompressor, BlockResult
from .expert_merge import (allocate_ranks, average_merge, cluster_experts, hierarchical_clusters, merge_rows,
                           merge_weights, most_frequent, regmean_merge, union_svd_factors)
from .expert_stats import (EXPERT_GRAMS, EXPERT_SPECTRA, EXPERT_STATS, EXPERT_WEIGHTED_GRAMS, ExpertGramStatistic,
                           ExpertSpectraStatistic, ExpertStatistic)
from .linalg import Whitening, balanced_factors, low_rank_params, target_rank, whitening
from .stats import Statistic

log = logging.getLogger(__name__)


class ExpertReductionConfig(CompressorConfig):
    """How many experts every MoE block keeps: ``num_experts`` (E'), or ``expert_ratio`` (fraction of
    the experts removed, like ``ratio`` everywhere: E' = round((1 − expert_ratio)·E))."""

    num_experts: int | None = Field(None, ge=1, description="experts kept per MoE block (E')")
    expert_ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of the experts removed")
    seed: int = Field(0, description="seed of the k-means++ initialization")
    clustering: Literal["kmeans", "hierarchical"] = Field(
        "kmeans", description="how experts are grouped: k-means on the output-similarity rows (Sub-MoE, "
                              "M-SMoE-like) or average-linkage hierarchical clustering (HC-SMoE)")

    @model_validator(mode="after")
    def _one_size(self) -> "ExpertReductionConfig":
        if self.fixed_groups is None and (self.num_experts is None) == (self.expert_ratio is None):
            raise ValueError("give exactly one of 'num_experts' or 'expert_ratio'")
        return self

    @property
    def fixed_groups(self) -> list[list[int]] | None:
        """Expert groups given by the user (the merge compressors' ``expert_groups``); None: from statistics."""
        return None

    def kept(self, experts: int, block: str | None = None) -> int:
        """E' for a block of ``experts`` experts (``block``: its name, for the error of fixed groups)."""
        groups = self.fixed_groups
        if groups is not None:
            given = sum(len(group) for group in groups)
            if given != experts:
                raise LrcompressError(f"{block or 'a MoE block'} has {experts} experts, but 'expert_groups' is a "
                                      f"partition of {given} (0..{given - 1}): it must cover every expert of every "
                                      "MoE block the stage targets")
            return len(groups)
        if self.num_experts is not None:
            kept = self.num_experts
        else:
            kept = max(1, round((1.0 - (self.expert_ratio or 0.0)) * experts))
        if kept >= experts:
            raise LrcompressError(f"keeping {kept} of {experts} experts is no reduction")
        return kept


class ExpertMergeConfig(ExpertReductionConfig):
    """The options of the compressors that merge groups of experts (``submoe``, ``expert_average``):
    ``expert_groups`` fixes the groups instead of clustering (E' = the number of groups)."""

    expert_groups: list[list[int]] | None = Field(
        None, description="merge exactly these groups of expert indices instead of clustering, e.g. "
                          "[[0, 1], [2, 3]]: a partition of 0..E−1 into E' groups, the same in every MoE block")

    @model_validator(mode="after")
    def _groups_are_a_partition(self) -> "ExpertMergeConfig":
        groups = self.expert_groups
        if groups is None:
            return self
        members = [i for group in groups for i in group]
        if not groups or any(not group for group in groups):
            raise ValueError("'expert_groups' needs at least one group and no empty group")
        repeated = sorted({i for i in members if members.count(i) > 1})
        if repeated:
            raise ValueError(f"'expert_groups' names expert(s) {repeated} in more than one group (it must be a "
                             "partition: every expert in exactly one group)")
        if sorted(members) != list(range(len(members))):
            raise ValueError(f"'expert_groups' must be a partition of the experts 0..E−1: its {len(members)} "
                             f"indices are {sorted(members)}, not 0..{len(members) - 1}")
        if len(groups) == len(members):
            raise ValueError("'expert_groups' has one group per expert: that is no reduction")
        if self.expert_ratio is not None:
            raise ValueError("'expert_groups' fixes the number of experts kept (one per group): drop 'expert_ratio'")
        if self.num_experts is not None and self.num_experts != len(groups):
            raise ValueError(f"'num_experts' is {self.num_experts} but 'expert_groups' has {len(groups)} groups: "
                             "they must agree (or drop 'num_experts')")
        if "clustering" in self.model_fields_set:
            raise ValueError("'expert_groups' replaces the clustering: drop 'clustering'")
        return self

    @property
    def fixed_groups(self) -> list[list[int]] | None:
        return self.expert_groups


class SubMoEConfig(ExpertMergeConfig):
    """Sub-MoE options; ``rank`` or ``ratio`` turns on Sub-MoE† (whitened, low-rank merged experts)."""

    merge: Literal["subspace", "regmean"] = Field(
        "subspace", description="subspace: the paper's union-SVD merge; regmean: per weight matrix the "
                                "Gram-weighted least-squares merge (Σ W_i G_i)(Σ G_i)⁻¹ (RegMean)")
    subspace_rank: int | None = Field(
        None, ge=1, description="keep this many singular triplets of the shared subspace (the merged weights "
                                "stay dense); default: min(out, in), the rank of one expert weight")
    subspace_energy: float | None = Field(
        None, gt=0.0, le=1.0, description="keep the fewest singular triplets holding this fraction of the "
                                          "union's Σσ² (capped at subspace_rank or min(out, in))")
    subspace_budget: float | None = Field(
        None, gt=0.0, le=1.0, description="keep this fraction of all MoE blocks' min(out, in) triplets in total "
                                          "(per block and weight type: see 'rank_allocation')")
    rank_allocation: Literal["uniform", "layers"] = Field(
        "uniform", description="how a budget of kept triplets (subspace_budget, or Sub-MoE†'s rank/ratio) is "
                               "shared: the same rank everywhere, or across MoE layers by their experts' spectra "
                               "(the multi-layer allocation; a pre-pass reads every block's weights)")
    rank_floor: float = Field(
        0.25, ge=0.0, le=1.0, description="rank_allocation: layers: every unit keeps at least this fraction of its "
                                          "uniform rank (Sub-MoE†) or of min(out, in) (subspace_budget)")
    regmean_damping: float = Field(1e-2, ge=0.0, description="RegMean: λ in Σ G_i + λ·mean(diag)·I")
    regmean_prior: Literal["zero", "average"] = Field(
        "zero", description="RegMean: what the ridge pulls unexcited input directions towards: 0 (plain ridge) "
                            "or the members' frequency-weighted average")
    rank: int | None = Field(None, ge=1, description="Sub-MoE†: rank of every merged expert weight "
                                                     "(capped at min(out, in))")
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Sub-MoE†: fraction of each merged expert "
                                                                 "weight's parameters removed (rank from it)")
    damping: float = Field(1e-4, ge=0.0, description="Sub-MoE†: λ in G + λ·mean(diag G)·I before Cholesky")

    @model_validator(mode="after")
    def _one_intra_size(self) -> "SubMoEConfig":
        if self.rank is not None and self.ratio is not None:
            raise ValueError("give at most one of 'rank' or 'ratio' (the intra-expert size of Sub-MoE†)")
        rules = [key for key in ("subspace_rank", "subspace_energy", "subspace_budget") if getattr(self, key) is not None]
        if rules and self.low_rank:
            raise ValueError("'subspace_rank'/'subspace_energy'/'subspace_budget' (dense truncation) and 'rank'/'ratio' "
                             "(Sub-MoE†, low-rank experts) are two truncations of the same subspace: give one")
        if self.merge == "regmean" and (rules or self.low_rank or self.rank_allocation != "uniform"):
            raise ValueError("'merge: regmean' has no subspace: drop 'subspace_*', 'rank', 'ratio' and 'rank_allocation'")
        if self.subspace_budget is not None and len(rules) > 1:
            raise ValueError("'subspace_budget' sets the truncation of every block: drop 'subspace_rank'/'subspace_energy'")
        if self.rank_allocation == "layers" and self.subspace_budget is None and not self.low_rank:
            raise ValueError("'rank_allocation: layers' shares a budget across MoE layers: give 'subspace_budget' (dense "
                             "merged experts) or 'rank'/'ratio' (Sub-MoE†)")
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

    def groups(self, statistic: ExpertStatistic, similarity: torch.Tensor, kept: int) -> list[list[int]]:
        """Members of each merged expert: the user's ``expert_groups`` (each sorted, ordered by their first
        member, like the clusters), else output-similarity clusters."""
        fixed = self.config.fixed_groups
        if fixed is not None:
            return sorted((sorted(group) for group in fixed), key=lambda group: group[0])
        if self.config.clustering == "hierarchical":
            return hierarchical_clusters(similarity, kept)
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

    def plan_for(self, name: str, module: nn.Module) -> Plan:
        self.config.kept(expert_count(module), name)          # a block the fixed groups do not fit: named
        return self.plan(module)

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> BlockResult:
        statistic = stats[EXPERT_STATS]
        assert isinstance(statistic, ExpertStatistic)
        kept = self.config.kept(expert_count(module), name)
        frequencies = statistic.frequencies()
        similarity = statistic.similarity(name)
        groups = self.groups(statistic, similarity, kept)
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


TRUNCATION_WARNING = 0.01    # share of the average a truncation may drop before it is reported


def _share_removed(merged: torch.Tensor, average: torch.Tensor) -> float:
    """‖merged − average‖ / ‖average‖: what the shared subspace's truncation took from the cluster's
    frequency-weighted average (0 at full rank: the untruncated union SVD merge *is* the average)."""
    norm = float(average.norm())
    return round(float((merged - average.to(merged)).norm()) / norm, 6) if norm > 0 else 0.0


def _warn_if_one_expert_rank_drops_signal(name: str, kind: str, members: list[int], share: float, rank: int,
                                          one_expert_rank: int) -> None:
    """Log a cluster whose merge at one expert's rank, min(out, in), drops more than ``TRUNCATION_WARNING`` of
    its average (a smaller rank the user asked for drops more by design and is not reported).

    Why: the paper reads the dropped union directions as conflict between experts; on experts fine-tuned
    a little apart they are ≈ 0.05% of the average, but on experts that differ in which neurons they use
    (Drop-Upcycled experts, bench/history/issue32-submoe.md) the rank min(out, in) drops ≈ 5% of gate/up and
    the merged block loses what each member learned alone (perplexity doubled on web and book text)."""
    if rank >= one_expert_rank and share > TRUNCATION_WARNING:
        log.warning("%s: Sub-MoE's shared subspace (rank %d) drops %.1f%% of the merged %s of experts %s: the "
                    "members differ beyond one expert's rank; expert_average keeps it", name, rank, 100 * share,
                    kind, members)


@register("submoe")
class SubMoE(ExpertReducer):
    """Sub-MoE: output-similarity clusters merged in a shared subspace (union SVD); with ``rank`` or
    ``ratio``, Sub-MoE†: the union SVD of routed-token-whitened weights, low-rank merged experts."""

    Config = SubMoEConfig
    config: SubMoEConfig

    @property
    def needs(self) -> frozenset[str]:       # type: ignore[override]
        if self.config.merge == "regmean":
            return ExpertReducer.needs | {EXPERT_WEIGHTED_GRAMS}
        extra = ({EXPERT_GRAMS} if self.config.low_rank else set()) | (
            {EXPERT_SPECTRA} if self.config.rank_allocation == "layers" else set())
        return ExpertReducer.needs | extra

    def merged_rank(self, module: nn.Module) -> int | None:
        if not self.config.low_rank:
            return None
        ranks = {self.config.rank_for(*t.shape[1:]) for t in expert_weights(module).types().values()}
        assert len(ranks) == 1, ranks     # (I × hidden) and (hidden × I): the formulas are symmetric
        return ranks.pop()

    def merge_experts(self, name: str, module: nn.Module, groups: list[list[int]], mix: list[torch.Tensor],
                      stats: Mapping[str, Statistic]) -> MergedExperts:
        if self.config.merge == "regmean":
            return self._regmean(name, module, groups, mix, stats)
        if not self.config.low_rank:
            return self._dense_merge(name, module, groups, mix, stats)
        rank = self.merged_rank(module)
        assert rank is not None
        if self.config.rank_allocation == "layers":
            (rank,) = set(self._allocated(name, module, stats).values())
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

    def _dense_merge(self, name: str, module: nn.Module, groups: list[list[int]], mix: list[torch.Tensor],
                     stats: Mapping[str, Statistic]) -> MergedExperts:
        """The paper's merge with dense merged experts, every weight type truncated at its rank: the
        default min(out, in), ``subspace_rank``, the block's share of ``subspace_budget``, and/or the
        fewest triplets holding ``subspace_energy`` of each cluster's Σσ²."""
        original = expert_weights(module)
        ranks = self._dense_ranks(name, module, stats)
        merged: dict[str, list[torch.Tensor]] = {kind: [] for kind in original.types()}
        kept: dict[str, list[int | None]] = {kind: [] for kind in original.types()}     # None: a 1-expert cluster
        removed: dict[str, list[float | None]] = {kind: [] for kind in original.types()}
        for members, w in zip(groups, mix):
            for kind, tensor in original.types().items():
                if len(members) == 1:
                    merged[kind].append(tensor[members[0]].to(torch.float64))
                    kept[kind].append(None)
                    removed[kind].append(None)
                    continue
                u, s, vt = union_svd_factors(tensor[members], w, ranks[kind], energy=self.config.subspace_energy)
                merged[kind].append((u * s) @ vt)
                kept[kind].append(len(s))
                removed[kind].append(_share_removed(merged[kind][-1], average_merge(tensor[members], w)))
                _warn_if_one_expert_rank_drops_signal(name, kind, members, removed[kind][-1], len(s),
                                                      min(tensor.shape[1:]))
        return MergedExperts(ExpertWeights(**{kind: torch.stack(ws) for kind, ws in merged.items()}),
                             details={"subspace_ranks": ranks, "cluster_ranks": kept, "share_of_average_removed": removed})

    def _dense_ranks(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> dict[str, int]:
        """Truncation rank of each weight type of this block (an energy rule may truncate further)."""
        shapes = {kind: tuple(t.shape[1:]) for kind, t in expert_weights(module).types().items()}
        if self.config.subspace_budget is None:
            return {kind: min(self.config.subspace_rank or min(shape), min(shape)) for kind, shape in shapes.items()}
        if self.config.rank_allocation == "layers":
            return self._allocated(name, module, stats)
        return {kind: max(1, round(self.config.subspace_budget * min(shape))) for kind, shape in shapes.items()}

    def _allocated(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> dict[str, int]:
        """This block's ranks under the multi-layer allocation: every block's (the pre-pass's table)."""
        spectra = stats[EXPERT_SPECTRA]
        assert isinstance(spectra, ExpertSpectraStatistic)
        uniform = self.merged_rank(module)
        allocation = allocate_layer_ranks(spectra.table, self.config.subspace_budget, uniform,
                                          self.config.rank_floor)
        return allocation[name]

    def _regmean(self, name: str, module: nn.Module, groups: list[list[int]], mix: list[torch.Tensor],
                 stats: Mapping[str, Statistic]) -> MergedExperts:
        """RegMean per cluster and weight type on the members' gate-weighted routed-token Grams; a cluster
        no calibration token reached falls back to the frequency-weighted average (logged)."""
        grams = stats[EXPERT_WEIGHTED_GRAMS]
        assert isinstance(grams, ExpertGramStatistic)
        original = expert_weights(module)
        merged: dict[str, list[torch.Tensor]] = {kind: [] for kind in original.types()}
        damping: list[float] = []
        for members, w in zip(groups, mix):
            reached = [m for m in members if int(grams.counts[m]) > 0]
            if len(members) == 1 or not reached:
                if len(members) > 1:
                    log.warning("%s: no calibration token reached experts %s: averaged instead of RegMean",
                                name, members)
                for kind, tensor in original.types().items():
                    merged[kind].append(average_merge(tensor[members], w) if len(members) > 1
                                        else tensor[members[0]].to(torch.float64))
                continue
            member_grams = [grams.grams(name, m) for m in reached]
            for kind, tensor in original.types().items():
                g = torch.stack([mg[kind] for mg in member_grams])
                prior = average_merge(tensor[members], w) if self.config.regmean_prior == "average" else None
                weight, added = regmean_merge(tensor[reached], g, self.config.regmean_damping, prior)
                merged[kind].append(weight)
                damping.append(added)
        result = {kind: torch.stack(ws) for kind, ws in merged.items()}
        if not all(torch.isfinite(t).all() for t in result.values()):
            raise NumericalError(f"{name}: the RegMean merge produced NaN/Inf")
        log.info("%s: RegMean, relative damping %g (absolute %s)", name, self.config.regmean_damping,
                 ", ".join(f"{d:.3g}" for d in damping) or "none: no merged cluster")
        return MergedExperts(ExpertWeights(**result),
                             numerical_path=f"float64; RegMean damping {self.config.regmean_damping:g}·mean(diag)",
                             details={"regmean_damping": [round(d, 9) for d in damping],
                                      "routed_tokens": grams.counts.tolist()})

    def _whitenings(self, name: str, grams: ExpertGramStatistic, member: int) -> dict[str, Whitening]:
        """One damped factor per distinct Gram of the member (gate and up share their input's)."""
        by_kind = grams.grams(name, member)
        inputs = whitening(by_kind["gate"], self.config.damping, f"{name}.experts[{member}].gate_up")
        down = whitening(by_kind["down"], self.config.damping, f"{name}.experts[{member}].down")
        return {"gate": inputs, "up": inputs, "down": down}


def allocate_layer_ranks(table: Mapping[str, ExpertSpectraStatistic], budget: float | None, uniform: int | None,
                         floor: float) -> dict[str, dict[str, int]]:
    """The multi-layer allocation: {block name: {weight type: rank}} for every block of the pre-pass table.

    Sub-MoE (Li et al., arXiv 2506.23266) allocates across MoE layers jointly instead of reducing every
    layer alike. Its "Multi-layer Adaptive Allocation" clusters the experts of several layers jointly and
    sets each layer's group count under the overall compression rate, so that layers with more redundant
    experts give up more (as summarized by a review of the paper; its full text, section and equation
    numbers could not be retrieved here, see docs/submoe.md). The checkpoint here keeps one expert count
    for all layers (a plain checkpoint has one ``num_experts``), so the closest reading allocates the other
    capacity a merged layer has, the rank of its shared subspace, and measures how many shared directions a
    layer needs by its experts' spectra: the (k+1)-th kept triplet of a unit is worth the mean over the
    layer's experts of σ_k(W_i)²/‖W_i‖² (``expert_merge.spectrum_shares``; a cluster of like experts, what
    the clustering forms, has a union spectrum close to its members' own, and the clusters themselves are
    not known before each layer's statistics are). ``expert_merge.allocate_ranks`` maximizes the total kept
    share under the budget. (Measured in bench/submoe_rank.py against the union spectrum of all of a layer's
    experts, which overstates what a cluster of like experts needs: see docs/submoe.md.)

    * dense merged experts (``uniform`` None): a unit is one weight type of one block, its ceiling
      min(out, in), the budget round(``budget`` · Σ ceilings) triplets;
    * Sub-MoE† (``uniform`` = the rank its rank/ratio gives every block): a unit is a block (its three
      weight types share one rank), a triplet is worth the mean of the three shares, the budget is
      ``uniform`` × blocks, so the stored parameters equal the uniform setting's (all blocks alike in shape).

    Every unit keeps at least ⌈``floor`` × (uniform rank, or its ceiling)⌉, and at least 1.
    """
    names = list(table)
    if uniform is None:
        units = [(name, kind) for name in names for kind in table[name].spectra]
        ceilings = [min(table[name].shapes[kind]) for name, kind in units]
        values = [table[name].spectra[kind][:c] for (name, kind), c in zip(units, ceilings)]
        floors = [max(1, math.ceil(floor * c)) for c in ceilings]
        total = round((budget or 0.0) * sum(ceilings))
    else:
        ceilings = [min(min(shape) for shape in table[name].shapes.values()) for name in names]
        values = [torch.stack([s[:c] for s in table[name].spectra.values()]).mean(0)
                  for name, c in zip(names, ceilings)]
        floors = [min(c, max(1, math.ceil(floor * uniform))) for c in ceilings]
        total = uniform * len(names)
    if total < sum(floors):
        raise LrcompressError(f"the allocation budget of {total} triplets is below the floors' {sum(floors)}: "
                              "lower 'rank_floor' or raise the budget")
    ranks = allocate_ranks(values, min(total, sum(ceilings)), floors, ceilings)
    if uniform is None:
        out: dict[str, dict[str, int]] = {name: {} for name in names}
        for (name, kind), rank in zip(units, ranks):
            out[name][kind] = rank
        return out
    return {name: {kind: rank for kind in table[name].spectra} for name, rank in zip(names, ranks)}


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

    Config = ExpertMergeConfig
    config: ExpertMergeConfig

    def merge(self, weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return average_merge(weights, w)


class ExpertPruneConfig(ExpertReductionConfig):
    score: Literal["frequency", "reap"] = Field(
        "frequency", description="which experts stay: the most routed-to, or the highest REAP scores (mean "
                                 "gate weight × expert output norm over the tokens routed to the expert)")

    @model_validator(mode="before")
    @classmethod
    def _no_groups(cls, data: Any) -> Any:
        if isinstance(data, dict) and "expert_groups" in data:
            raise ValueError("'expert_groups' is an option of the merge compressors (submoe, expert_average): "
                             "expert_prune merges nothing, it keeps the E' highest-scoring experts")
        return data


@register("expert_prune")
class ExpertPrune(ExpertReducer):
    """Baseline: keep the E' experts with the highest score unchanged (routing frequency, or REAP's
    router-weighted activation norm, Lasby et al., arXiv 2510.13999), drop the others."""

    Config = ExpertPruneConfig
    config: ExpertPruneConfig

    def groups(self, statistic: ExpertStatistic, similarity: torch.Tensor, kept: int) -> list[list[int]]:
        scores = statistic.reap_scores() if self.config.score == "reap" else statistic.frequencies()
        return [[i] for i in most_frequent(scores, kept)]


__all__ = ["ExpertAverage", "ExpertMergeConfig", "ExpertPrune", "ExpertReducer", "SubMoE", "INPUT_SAMPLE", "allocate_layer_ranks"]
