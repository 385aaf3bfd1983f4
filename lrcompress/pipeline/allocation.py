"""One budget for a stage's modules: choose each module's rank before any decomposition.

A stage whose ``allocation.strategy`` is not ``uniform`` turns its method's ratio (or rank) into one
budget: B = Σ_modules ``RankKnob.budget_params`` (the kept parameters the method's own setting allows
each module, unrounded). Each module i then gets a rank r_i (in the unit of its method's knob, whose
exact stored size is ``RankKnob.params(r)``: r·``step_params`` for a factorization, a price with
uneven steps for CoSpaDi) with floor_i ≤ r_i ≤ ceiling_i, Σ params_i(r_i) ≤ B, and no module below
its ceiling whose next step would still fit (so the budget is met within one rank step). The compressors
are only asked for their knob's price (``Compressor.rank_knob``) and for a copy at a given rank
(``Compressor.with_rank``); this module never names a method. See docs/budget.md for the derivations.

- ``spectrum`` (SVD-LLM V2, arXiv 2503.12340, heterogeneous ratio allocation): within each group of
  modules of one projection type (same name at every depth), the theoretical truncation loss L_i at the
  stage's uniform setting sets each member's removed fraction ∝ 1/log L_i, keeping the group's mean.
- ``global``: every whitened singular component of every module is priced by its estimated loss
  increase per parameter, from a K-FAC Fisher G_y ⊗ G_x: dropping component i of W·S = Σ σ_i u_i v_iᵀ
  costs ½·σ_i²·u_iᵀ G_y u_i (cross terms vanish: the v_i are orthonormal), with diag(G_y) from one
  backward pre-pass. Components are kept greedily by score per parameter against the budget, along
  the upper concave hull of each module's cumulative score against its cumulative price (a
  compressor keeps a prefix of its spectrum, so a module's ranks are taken in order).
"""
from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..compressor import Compressor, Plan, RankKnob
from ..compressor.linalg import GramMetric
from ..errors import LrcompressError
from ..models import ArchitectureAdapter
from .bytebudget import BudgetCompressor, ByteBudgetResult, allocate_bytes, output_diagonals
from .settings import Stage
from .spectra import ModuleSpectrum, collect_spectra
from .walk import LayerWalk

log = logging.getLogger(__name__)


def strategy_of(stage: Stage) -> str:
    """uniform, spectrum or global (a stage's ``allocation``), or bytes (the stage of a recipe's ``budget``)."""
    if isinstance(stage.compressor, BudgetCompressor):
        return "bytes"
    return "uniform" if stage.allocation is None else stage.allocation.strategy


def needs_allocation(stages: list[Stage]) -> bool:
    return any(strategy_of(stage) != "uniform" for stage in stages)


def needs_gradients(stages: list[Stage]) -> bool:
    return any(strategy_of(stage) in ("global", "bytes") for stage in stages)


@dataclass
class BudgetModule:
    """One module of a stage's budget: its knob, bounds, spectrum and (after allocation) rank."""

    name: str
    kind: str                  # the projection type: the name inside the decoder layer
    layer: int
    knob: RankKnob
    floor: int
    ceiling: int
    spectrum: ModuleSpectrum | None = None
    rank: int = 0


# ---------------------------------------------------------------------------------------------
# Fitting real-valued targets to the budget


def fit_to_budget(modules: list[BudgetModule], targets: list[float], budget: float) -> list[int]:
    """Integer ranks within [floor, ceiling], as close to ``targets`` as the budget allows.

    Start from the rounded-down clamped targets, then add single steps (to the module furthest below
    its target) while any fits, or remove steps (from the module furthest above its target) while the
    budget is exceeded (each step at its own price). Ends with Σ params(r) ≤ budget and no step of a
    module below its ceiling left that fits."""
    ranks = [min(max(int(math.floor(t)), m.floor), m.ceiling) for m, t in zip(modules, targets)]
    used = sum(m.knob.params(r) for r, m in zip(ranks, modules))
    floors = sum(m.knob.params(m.floor) for m in modules)
    if floors > budget:
        raise LrcompressError(f"allocation: the floors alone need {floors:,} parameters, more than the budget "
                              f"{budget:,.0f}; lower allocation.floor")
    # Too much: remove from those furthest above their target (their smallest deficit first).
    above = [(t - r, i) for i, (r, t) in enumerate(zip(ranks, targets)) if ranks[i] > modules[i].floor]
    heapq.heapify(above)
    while used > budget and above:
        _, i = heapq.heappop(above)
        used -= _step(modules[i].knob, ranks[i] - 1)
        ranks[i] -= 1
        if ranks[i] > modules[i].floor:
            heapq.heappush(above, (targets[i] - ranks[i], i))
    # Room left: add to those furthest below their target, while a step fits.
    below = [(-(t - r), i) for i, (r, t) in enumerate(zip(ranks, targets)) if ranks[i] < modules[i].ceiling]
    heapq.heapify(below)
    while below:
        _, i = heapq.heappop(below)
        if used + _step(modules[i].knob, ranks[i]) > budget:
            continue                         # this one does not fit; a cheaper one may
        used += _step(modules[i].knob, ranks[i])
        ranks[i] += 1
        if ranks[i] < modules[i].ceiling:
            heapq.heappush(below, (-(targets[i] - ranks[i]), i))
    return ranks


# ---------------------------------------------------------------------------------------------
# The strategies


def allocate_uniform(modules: list[BudgetModule], budget: float) -> list[int]:
    """The method's own rank for every module (today's behaviour; no bounds, no budget fitting)."""
    return [m.knob.rank for m in modules]


def allocate_spectrum(modules: list[BudgetModule], budget: float) -> list[int]:
    """SVD-LLM V2: per projection type, removed fraction ∝ 1/log(L_min) at the uniform setting."""
    targets = [0.0] * len(modules)
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(modules):
        groups.setdefault(m.kind, []).append(i)
    for kind, members in groups.items():
        losses = [modules[i].spectrum.truncation_loss(modules[i].knob.rank) for i in members]
        logs = [math.log(loss) if loss > 0 else 0.0 for loss in losses]
        if min(logs) <= 0.0:
            # The rule needs log L > 0; it holds for losses on the scale of the summed Gram of a real
            # calibration set. Otherwise (tiny or exact problems) the group keeps its uniform split.
            log.warning("allocation: %s has a truncation loss ≤ 1 (log ≤ 0); its group stays uniform", kind)
            weights = [1.0] * len(members)
        else:
            weights = [1.0 / value for value in logs]
        removed = [_dense(modules[i].knob) - modules[i].knob.budget_params for i in members]
        total_removed, total_weight = sum(removed), sum(weights)
        for i, weight in zip(members, weights):
            share = total_removed * weight / total_weight             # = |G|·R·w_i/Σw for equal shapes
            kept = _dense(modules[i].knob) - share
            targets[i] = _rank_at(modules[i], kept)
    return fit_to_budget(modules, targets, budget)


def allocate_global(modules: list[BudgetModule], budget: float) -> list[int]:
    """Greedy over all components by estimated loss increase per parameter, floors first."""
    ranks = [m.floor for m in modules]
    left = budget - sum(m.knob.params(m.floor) for m in modules)
    if left < 0:
        return fit_to_budget(modules, [float(m.floor) for m in modules], budget)   # raises with the reason
    segments = []            # (−density, module, start rank, end rank)
    for index, m in enumerate(modules):
        scores = m.spectrum.scores()[: m.ceiling].tolist()
        for start, end, gain in _hull_segments(scores, m.floor, m.knob.params):
            segments.append((-gain / (m.knob.params(end) - m.knob.params(start)), index, start, end))
    segments.sort()
    blocked = [False] * len(modules)       # a module whose segment was cut keeps that prefix only
    for _, index, start, end in segments:
        knob = modules[index].knob
        if blocked[index] or ranks[index] != start:
            continue
        reach = start                      # as far along the segment as the budget pays for
        while reach < end and knob.params(reach + 1) - knob.params(start) <= left:
            reach += 1
        ranks[index] = reach
        left -= knob.params(reach) - knob.params(start)
        if reach < end:
            blocked[index] = True
    return ranks


def _hull_segments(scores: list[float], floor: int, params: Callable[[int], int]) -> list[tuple[int, int, float]]:
    """Upper concave hull of the cumulative score against the cumulative price from rank ``floor``
    on (prices may differ from step to step): (start rank, end rank, Σ scores)."""
    points = [(floor, float(params(floor)), 0.0)]
    total = 0.0
    for rank in range(floor, len(scores)):
        total += max(scores[rank], 0.0)
        points.append((rank + 1, float(params(rank + 1)), total))
    hull: list[tuple[int, float, float]] = []
    for point in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) >= 0:
            hull.pop()
        hull.append(point)
    return [(a[0], b[0], b[2] - a[2]) for a, b in zip(hull, hull[1:])]


def _cross(o: tuple[int, float, float], a: tuple[int, float, float], b: tuple[int, float, float]) -> float:
    return (a[1] - o[1]) * (b[2] - o[2]) - (a[2] - o[2]) * (b[1] - o[1])


def _step(knob: RankKnob, rank: int) -> int:
    """The price of going from ``rank`` to ``rank + 1``."""
    return knob.params(rank + 1) - knob.params(rank)


def _rank_at(m: BudgetModule, kept: float) -> float:
    """The real-valued rank whose price is ``kept`` (interpolated within a step; prices increase)."""
    knob = m.knob
    if knob.price is None:
        return kept / knob.step_params
    low, high = 0, max(m.ceiling, 1)
    while low < high:                      # the largest rank whose price is at most ``kept``
        middle = (low + high + 1) // 2
        low, high = (middle, high) if knob.params(middle) <= kept else (low, middle - 1)
    return low + max(0.0, kept - knob.params(low)) / _step(knob, low)


def _dense(knob: RankKnob) -> float:
    """The parameters of the dense module (what a ratio is a fraction of)."""
    return float(knob.dense_params)


ALLOCATORS = {"uniform": allocate_uniform, "spectrum": allocate_spectrum, "global": allocate_global}


# ---------------------------------------------------------------------------------------------
# Binding the ranks to the stage


class AllocatedCompressor(Compressor):
    """A stage's compressor with a rank per module (full name); the engine sees the same contract."""

    def __init__(self, inner: Compressor, ranks: Mapping[str, int]) -> None:
        super().__init__(inner.config)
        self.inner, self.ranks = inner, dict(ranks)
        self.name = inner.name               # type: ignore[misc]  (records name the method)
        self.needs = inner.needs             # type: ignore[misc]

    @property
    def group_size(self) -> int:
        return self.inner.group_size

    @property
    def takes_target(self) -> bool:
        """Output matching (runtime.target: original) treats the wrapped method as it would alone."""
        return bool(getattr(self.inner, "takes_target", False))

    def _for(self, name: str) -> Compressor:
        return self.inner.with_rank(self.ranks[name]) if name in self.ranks else self.inner

    def plan(self, module: nn.Module) -> Plan:
        return self.inner.plan(module)

    def plan_for(self, name: str, module: nn.Module) -> Plan:
        return self._for(name).plan(module)

    def rank_knob(self, module: nn.Module) -> RankKnob | None:
        return self.inner.rank_knob(module)

    def compress(self, name: str, module: nn.Module, stats):
        return self._for(name).compress(name, module, stats)


@dataclass
class AllocatedModule:
    """One module's allocated rank beside the uniform one, with the loss each is estimated to cost."""

    name: str
    kind: str
    layer: int
    rank: int
    uniform_rank: int
    floor: int
    ceiling: int
    step_params: int
    estimated_loss_uniform: float
    estimated_loss: float


@dataclass
class AllocatedStage:
    """A stage's budget, what the allocation spent of it, and its modules (metrics.json ``allocation``)."""

    stage: int
    method: str
    strategy: str
    floor: float
    ceiling: float
    budget_params: float
    allocated_params: int
    uniform_params: int
    modules: list[AllocatedModule] = field(default_factory=list)

    def by_kind(self) -> dict[str, list[AllocatedModule]]:
        """The modules grouped by kind (projection type), in their order."""
        kinds: dict[str, list[AllocatedModule]] = {}
        for module in self.modules:
            kinds.setdefault(module.kind, []).append(module)
        return kinds


@dataclass
class AllocationResult:
    """What the allocation chose, per stage, for --dry-run, metrics.json, the report and inspect;
    ``prepass``: the spectra (and output-gradient) pre-passes' reports."""

    stages: list[AllocatedStage] = field(default_factory=list)
    prepass: dict[str, Any] = field(default_factory=dict)
    budget: ByteBudgetResult | None = None          # a recipe's byte budget: every module's choice

    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for stage in self.stages for m in stage.modules}


def stage_modules(model: nn.Module, adapter: ArchitectureAdapter, stage: Stage) -> list[BudgetModule]:
    """Every module of ``stage`` with its knob and bounds (no spectrum yet)."""
    spec = stage.allocation
    modules = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(index)
        for name in stage.select(layer, prefix):
            module = layer.get_submodule(name)
            knob = stage.compressor.rank_knob(module)
            if knob is None:
                raise LrcompressError(f"stage {stage.index} ({stage.compressor.name}): allocation "
                                      f"{spec.strategy!r} needs a rank or sparsity knob, which this method "
                                      f"has not for {prefix}.{name} (see docs/budget.md)")
            floor = max(1, math.ceil(spec.floor * knob.max_rank))
            ceiling = max(floor, math.floor(spec.ceiling * knob.max_rank))
            modules.append(BudgetModule(f"{prefix}.{name}", name, index, knob, floor, ceiling))
    return modules


def allocate(walk: LayerWalk, stages: list[Stage], budget_cache: dict[str, Any] | None = None
             ) -> tuple[list[Stage], AllocationResult | None]:
    """Choose the ranks of every stage whose allocation is not uniform: the stages to compress with (a copy
    of each such stage whose compressor is an ``AllocatedCompressor``, the others as they are) and the
    allocation's record (None when every stage is uniform). A byte budget's stage gets its choices bound in
    place (``bytebudget.allocate_bytes``; ``budget_cache``: the key its prices are kept under, or None)."""
    model, adapter, windows = walk.model, walk.adapter, walk.windows
    budgeted = [stage for stage in stages if strategy_of(stage) == "bytes"]
    planned = [stage for stage in stages if strategy_of(stage) not in ("uniform", "bytes")]
    if not planned and not budgeted:
        return stages, None
    result = AllocationResult()
    if budgeted:            # the recipe's budget section: one stage, bound in place to its modules' choices
        result.budget = allocate_bytes(walk, budgeted[0], budget_cache)
    if not planned:
        return stages, result
    if any(stage.group_size > 1 for stage in planned):
        raise LrcompressError("allocation: a stage that compresses groups of layers together has one size "
                              "per group; use allocation: uniform there")
    per_stage = {stage.index: stage_modules(model, adapter, stage) for stage in planned}
    targets: dict[int, list[str]] = {}
    metrics: dict[str, GramMetric] = {}
    for stage in planned:
        for m in per_stage[stage.index]:
            inside = m.name[len(adapter.layer_prefix(m.layer)) + 1:]
            if inside not in targets.setdefault(m.layer, []):
                targets[m.layer].append(inside)
            metrics[m.name] = GramMetric.of(stage.compressor.config)
    report: dict[str, Any] = {}
    diagonals = None
    if needs_gradients(planned):
        diagonals, report["output_gradients"] = _output_diagonals(walk, planned, per_stage)
    walk.observer.phase(f"spectra pre-pass over {len(windows)} windows for {len(metrics)} modules")
    spectra, report["spectra"] = collect_spectra(walk, targets, metrics, diagonals)
    result.prepass = report
    allocated = {}
    for stage in planned:
        modules = per_stage[stage.index]
        for m in modules:
            m.spectrum = spectra[m.name]
        budget = sum(m.knob.budget_params for m in modules)
        ranks = ALLOCATORS[strategy_of(stage)](modules, budget)
        for m, rank in zip(modules, ranks):
            m.rank = rank
        allocated[stage.index] = replace(stage, compressor=AllocatedCompressor(stage.compressor,
                                                                               {m.name: m.rank for m in modules}))
        result.stages.append(_stage_summary(stage, modules, budget))
    return [allocated.get(stage.index, stage) for stage in stages], result


def _output_diagonals(walk: LayerWalk, stages: list[Stage], per_stage: dict[int, list[BudgetModule]],
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """diag(G_y) of every module of the ``global`` stages, from one backward pre-pass (reduced)."""
    names = []
    for stage in stages:
        if strategy_of(stage) == "global":
            names += [m.name for m in per_stage[stage.index] if m.name not in names]
    return output_diagonals(walk, names)


def _stage_summary(stage: Stage, modules: list[BudgetModule], budget: float) -> AllocatedStage:
    used = sum(m.knob.params(m.rank) for m in modules)
    uniform = sum(m.knob.params(m.knob.rank) for m in modules)
    return AllocatedStage(
        stage=stage.index, method=stage.compressor.name, strategy=strategy_of(stage),
        floor=stage.allocation.floor, ceiling=stage.allocation.ceiling,
        budget_params=budget, allocated_params=used, uniform_params=uniform,
        modules=[AllocatedModule(name=m.name, kind=m.kind, layer=m.layer, rank=m.rank, uniform_rank=m.knob.rank,
                                 floor=m.floor, ceiling=m.ceiling, step_params=m.knob.step_params,
                                 estimated_loss_uniform=_estimate(m, m.knob.rank),
                                 estimated_loss=_estimate(m, m.rank)) for m in modules])


def _estimate(m: BudgetModule, rank: int) -> float:
    """Σ of the dropped components' scores: the truncation loss² (spectrum) or the K-FAC estimate."""
    return float(m.spectrum.scores()[rank:].sum()) if m.spectrum is not None else float("nan")


__all__ = ["ALLOCATORS", "AllocatedCompressor", "AllocatedModule", "AllocatedStage", "AllocationResult",
           "BudgetModule", "allocate", "allocate_global", "allocate_spectrum", "allocate_uniform",
           "fit_to_budget", "needs_allocation", "stage_modules"]
