"""A model-wide byte budget: one choice per module (bits and group, a rank, ...) from one loss per byte.

A recipe's ``budget`` section names a size (``bytes``, ``mib`` or ``bits_per_weight``) and a set of
allowed choices (a method with its options, list-valued options expanded into alternatives). Every
target module is offered every choice; each is priced in two numbers, measured before the run on the
*uncompressed* model (one forward sweep, layer by layer, at most one layer's Grams alive):

- its **bytes**: ``storage_bytes`` of the replacement the choice's compressor builds (codes, scales, zero
  points, factors and bias: exactly what the checkpoint stores for that module);
- its **estimated loss increase**, the K-FAC estimate of docs/budget.md applied to the replacement's actual
  weight change ΔW = W − Ŵ: ΔL ≈ ½·tr(G_y·ΔW·G_x·ΔWᵀ) with G_x = XᵀX (the Gram) and diag(G_y) from the
  output-gradient pre-pass. For a truncation this is the global allocation's component score summed over
  the dropped components; for a quantizer it is the rounding error on its grid weighted by the inputs
  and the loss gradients (HAWQ-V2/V3's Fisher-weighted error, Dong et al. 2020, Yao et al. 2021). Both are
  in one unit, so bits, groups and ranks compete on one scale. The pipeline never names a method: a
  choice is priced by calling its compressor (statistics: the Gram alone).

The allocation is a multiple-choice knapsack (one choice per module, Σ bytes ≤ budget, Σ loss minimal),
solved exactly by dynamic programming over the bytes above each module's cheapest choice, in units of
their greatest common divisor, when that table is small enough (``DP_CELLS``); otherwise by the greedy
over the lower convex hull of each module's (bytes, loss) choices (Sinha & Zoltners 1979) followed by a
fill of what is left. The LP relaxation's optimum is recorded as a lower bound beside either, so the
distance to the integer optimum is bounded in the record.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..compressor import CompressResult, Compressor, CompressorConfig, Plan, get_compressor
from ..compressor.stats import GramStatistic, OriginalWeight
from ..checkpoint.layout import write_atomic
from ..core.cache import cache_root
from ..errors import LrcompressError
from ..modules import dense_weight, storage_bytes, stored_params
from .prepass import PREPASSES
from .settings import Stage
from .spectra import sweep_grams
from .walk import LayerWalk

MIB = 2**20
DP_CELLS = 40_000_000          # modules × byte units above which the exact table gives way to the greedy
PRICED_NEEDS = frozenset({"gram"})   # what the pre-pass can hand a choice's compressor


@dataclass
class Choice:
    """One allowed configuration: a label for tables and its steps, (method, validated config) applied in
    order to one module (one step, or a compression then a compensation of its error)."""

    label: str
    steps: list[tuple[str, CompressorConfig]]

    def compressor(self) -> Compressor:
        made = [get_compressor(method)(config) for method, config in self.steps]
        return made[0] if len(made) == 1 else ChainCompressor(made)


class ChainCompressor(Compressor):
    """Several compressors applied in order to one module: each gets the previous one's replacement and the
    module's ``original_weight`` (built here when the engine has not, as in the pricing pre-pass)."""

    def __init__(self, steps: list[Compressor]) -> None:
        super().__init__(CompressorConfig())
        self.steps = steps
        self.name = "+".join(step.name for step in steps)                            # type: ignore[misc]
        self.needs = frozenset().union(*(step.needs for step in steps))             # type: ignore[misc]

    @property
    def takes_target(self) -> bool:
        return all(step.takes_target for step in self.steps)

    def plan(self, module: nn.Module) -> Plan:
        """Each later step's plan adds what it stores beyond the module it is planned on (as ``plan_modules``
        adds a later stage's change); a step on the factors (``apply_to: factors``) plans the whole module
        from the spec of the step before it."""
        first = plan = self.steps[0].plan(module)
        params, size = first.params_after, planned_bytes(self.steps[0], module)
        for step in self.steps[1:]:
            if step.acts_on_factors:
                plan = step.plan_factors(self.name, plan.spec, next(module.parameters()).dtype)
                params, size = plan.params_after, plan.bytes_after
            else:
                plan = step.plan(module)
                params += plan.params_after - stored_params(module)
                size += planned_bytes(step, module) - storage_bytes(module)
        return Plan(params, plan.rank or first.rank, size)

    def compress(self, name: str, module: nn.Module, stats):
        if "original_weight" not in stats:
            stats = {**stats, "original_weight": OriginalWeight(dense_weight(module).detach())}
        result = self.steps[0].compress(name, module, stats)
        for step in self.steps[1:]:
            later = step.compress(name, result.module, stats)
            result = CompressResult(later.module, later.rank if later.rank is not None else result.rank,
                                    f"{result.numerical_path}; {step.name}: {later.numerical_path}",
                                    {**result.details, **later.details})
        return result


class BudgetCompressor(Compressor):
    """The byte budget's stage: each module is compressed by the choice the allocation gave it.

    Before the allocation it plans every module at its first choice (what ``preflight`` sees); the
    engine sees one stage, collects the union of the choices' statistics once per layer, and records
    ``details.choice`` beside the usual record."""

    name = "budget"      # type: ignore[misc]
    recipe_key = "budget"     # the recipe section messages name (preflight)

    def __init__(self, choices: list[Choice], spec: Any) -> None:
        super().__init__(CompressorConfig())
        self.choices, self.spec = choices, spec          # spec: the recipe's BudgetSpec (its size and solver)
        self.compressors = [choice.compressor() for choice in choices]
        self.needs = frozenset().union(*(c.needs for c in self.compressors))   # type: ignore[misc]
        self.chosen: dict[str, int] = {}
        self.priced_bytes: dict[str, int] = {}       # after the allocation: the chosen replacement's bytes

    @property
    def takes_target(self) -> bool:
        return all(c.takes_target for c in self.compressors)

    def _for(self, name: str) -> Compressor:
        return self.compressors[self.chosen.get(name, 0)]

    def method_for(self, name: str) -> str:
        return self._for(name).name if name in self.chosen else self.name

    def plan(self, module: nn.Module) -> Plan:
        return self.compressors[0].plan(module)

    def plan_for(self, name: str, module: nn.Module) -> Plan:
        """The chosen method's plan, with the bytes its replacement was measured to store when priced."""
        plan = self._for(name).plan(module)
        return replace(plan, bytes_after=self.priced_bytes[name]) if name in self.priced_bytes else plan

    def compress(self, name: str, module: nn.Module, stats):
        if name not in self.chosen:
            raise LrcompressError(f"{name}: the byte budget chose nothing for this module (no allocation ran)")
        result = self._for(name).compress(name, module, stats)
        result.details = {**result.details, "choice": self.choices[self.chosen[name]].label}
        return result


# ---------------------------------------------------------------------------------------------
# The multiple-choice knapsack


@dataclass
class Solution:
    picks: list[int]              # per module, the index of its choice
    loss: float
    bytes: int
    solver: str                   # "dp" (exact) or "hull-greedy"
    lower_bound: float            # the LP relaxation's optimum: no choice of modules does better


def _pareto(costs: list[int], losses: list[float]) -> list[int]:
    """Indices of the choices no other beats (fewer or equal bytes and lower loss), by increasing bytes."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], losses[j]))
    kept: list[int] = []
    for j in order:
        if not kept or losses[j] < losses[kept[-1]]:
            if kept and costs[j] == costs[kept[-1]]:
                continue
            kept.append(j)
    return kept


def _hull(costs: list[int], losses: list[float], pareto: list[int]) -> list[int]:
    """The lower convex hull of a module's Pareto choices in the (bytes, loss) plane, by increasing bytes."""
    hull: list[int] = []
    for j in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a→j: it is never the best use of its bytes
            if (losses[b] - losses[a]) * (costs[j] - costs[a]) >= (losses[j] - losses[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _segments(costs: list[list[int]], losses: list[list[float]], hulls: list[list[int]]
              ) -> list[tuple[float, int, int, int]]:
    """Every hull step of every module, best loss saved per byte first: (−density, module, from, to)."""
    steps = []
    for i, hull in enumerate(hulls):
        for a, b in zip(hull, hull[1:]):
            steps.append((-(losses[i][a] - losses[i][b]) / (costs[i][b] - costs[i][a]), i, a, b))
    steps.sort()
    return steps


def lp_bound(costs: list[list[int]], losses: list[list[float]], budget: int) -> float:
    """The optimum of the LP relaxation (a fraction of one hull step allowed): a lower bound on the loss."""
    hulls = [_hull(c, row, _pareto(c, row)) for c, row in zip(costs, losses)]
    left = budget - sum(c[h[0]] for c, h in zip(costs, hulls))
    loss = sum(row[h[0]] for row, h in zip(losses, hulls))
    for density, i, a, b in _segments(costs, losses, hulls):
        price = costs[i][b] - costs[i][a]
        if price > left:
            return loss + density * left        # density < 0: the fraction of the step that fits
        left -= price
        loss -= losses[i][a] - losses[i][b]
    return loss


def solve_greedy(costs: list[list[int]], losses: list[list[float]], budget: int) -> list[int]:
    """Hull steps by loss saved per byte while they fit (a module whose step does not fit stops there),
    then the bytes left go to the single upgrades (any cheaper-in-loss choice that fits) saving most."""
    hulls = [_hull(c, row, _pareto(c, row)) for c, row in zip(costs, losses)]
    picks = [h[0] for h in hulls]
    left = budget - sum(c[p] for c, p in zip(costs, picks))
    blocked = [False] * len(costs)
    for _, i, a, b in _segments(costs, losses, hulls):
        if blocked[i] or picks[i] != a:
            continue
        price = costs[i][b] - costs[i][a]
        if price <= left:
            picks[i], left = b, left - price
        else:
            blocked[i] = True
    while True:                       # fill: the best single upgrade that still fits
        best = None
        for i, (c, row) in enumerate(zip(costs, losses)):
            for j in range(len(c)):
                extra, saved = c[j] - c[picks[i]], row[picks[i]] - row[j]
                if saved > 0 and extra <= left and (best is None or saved > best[0]):
                    best = (saved, i, j, extra)
        if best is None:
            return picks
        _, i, j, extra = best
        picks[i], left = j, left - extra


def solve_dp(costs: list[list[int]], losses: list[list[float]], budget: int, cells: int | None = None
             ) -> list[int] | None:
    """The exact optimum by dynamic programming over the bytes above every module's cheapest choice, in
    units of their greatest common divisor; None when the table would exceed ``cells`` (``DP_CELLS``) entries."""
    cells = DP_CELLS if cells is None else cells
    base = [min(c) for c in costs]
    left = budget - sum(base)
    extras = [[cost - b for cost in c] for c, b in zip(costs, base)]
    unit = 0
    for extra in extras:
        for value in extra:
            unit = math.gcd(unit, value)
    capacity = left // unit if unit else 0
    if (capacity + 1) * len(costs) > cells:
        return None
    best = np.zeros(capacity + 1)                 # least loss of the modules so far within c units
    picks = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for i, (extra, loss) in enumerate(zip(extras, losses)):
        table = np.full(capacity + 1, np.inf)
        for j, (e, value) in enumerate(zip(extra, loss)):
            units = e // unit if unit else 0
            if units > capacity:
                continue
            candidate = best[: capacity + 1 - units] + value
            better = candidate < table[units:]
            table[units:][better] = candidate[better]
            picks[i, units:][better] = j
        best = table
    chosen, c = [0] * len(costs), capacity
    for i in range(len(costs) - 1, -1, -1):
        chosen[i] = int(picks[i, c])
        c -= extras[i][chosen[i]] // unit if unit else 0
    return chosen


def solve(costs: list[list[int]], losses: list[list[float]], budget: int, solver: str = "auto") -> Solution:
    """One choice per module with Σ bytes ≤ ``budget`` and the least Σ loss (see the module's docstring)."""
    least = sum(min(c) for c in costs)
    if least > budget:
        raise LrcompressError(f"budget: the cheapest choice of every module alone needs {least:,} bytes, more "
                              f"than the {budget:,} the budget leaves them; allow smaller choices or raise it")
    picks = solve_dp(costs, losses, budget) if solver in ("auto", "dp") else None
    name = "dp"
    if picks is None:
        if solver == "dp":
            raise LrcompressError(f"budget: solver dp needs more than {DP_CELLS:,} table cells here; use auto or greedy")
        picks, name = solve_greedy(costs, losses, budget), "hull-greedy"
    return Solution(picks, float(sum(row[p] for row, p in zip(losses, picks))), sum(c[p] for c, p in zip(costs, picks)),
                    name, lp_bound(costs, losses, budget))


# ---------------------------------------------------------------------------------------------
# Pricing every choice of every module


@dataclass
class Priced:
    """One module's choices: bytes and estimated loss of each, and the dense module's bytes."""

    name: str
    kind: str
    layer: int
    dense_bytes: int
    weights: int
    costs: list[int]
    losses: list[float]


def output_diagonals(walk: LayerWalk, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """diag(G_y) of every module in ``names``, from one backward pre-pass (reduced across processes)."""
    walk.observer.phase(f"output-gradient pre-pass over {len(walk.windows)} windows for {len(names)} modules")
    result = PREPASSES["output_gradient"](walk, names)
    statistics = walk.settings.collective.reduce_statistics(result.statistics)
    diagonals = {name: statistic.diagonal(name) for name, statistic in statistics.items()}
    return diagonals, {k: v for k, v in result.report.items() if isinstance(v, (int, float, str))}


def estimated_loss(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor, diagonal: torch.Tensor) -> float:
    """tr(diag(d)·ΔW·G·ΔWᵀ) for ΔW = W − Ŵ (twice the K-FAC estimate; the ½ is one constant for all)."""
    delta = weight.to(torch.float64) - approx.to(device=weight.device, dtype=torch.float64)
    rows = ((delta @ gram.to(delta)) * delta).sum(dim=1)
    return float((rows * diagonal.to(rows)).sum())


def price_choices(walk: LayerWalk, stage: Stage, diagonals: Mapping[str, torch.Tensor]
                  ) -> tuple[list[Priced], dict]:
    """Every choice of every target of ``stage``, priced on the uncompressed model (one Gram sweep)."""
    budget: BudgetCompressor = stage.compressor       # type: ignore[assignment]
    adapter = walk.adapter
    targets = {index: stage.select(layer, adapter.layer_prefix(index))
               for index, layer in enumerate(adapter.decoder_layers(walk.model))}

    def visit(full: str, module: nn.Module, gram: GramStatistic) -> Priced:
        weight = dense_weight(module).detach()
        matrix = gram.gram(full)
        costs, losses = [], []
        for compressor in budget.compressors:
            result = compressor.compress(full, module, {"gram": gram})
            costs.append(storage_bytes(result.module))
            losses.append(estimated_loss(weight, dense_weight(result.module).detach(), matrix, diagonals[full]))
        layer = next(i for i, names in targets.items() if full.startswith(adapter.layer_prefix(i) + "."))
        return Priced(full, full[len(adapter.layer_prefix(layer)) + 1:], layer, storage_bytes(module), weight.numel(),
                      costs, losses)

    priced, report = sweep_grams(walk, targets, visit, "pricing the budget's choices")
    order = [f"{adapter.layer_prefix(i)}.{n}" for i, names in targets.items() for n in names]
    return [priced[name] for name in order], report


# ---------------------------------------------------------------------------------------------
# The record


@dataclass
class BudgetedModule:
    """One module's choice: its label, bytes and estimated loss, beside the dense module's bytes."""

    name: str
    kind: str
    layer: int
    choice: str
    bytes: int
    dense_bytes: int
    estimated_loss: float
    weights: int = 0                   # the module's weight values (bits per weight = 8·bytes / weights)


@dataclass
class ByteBudgetResult:
    """What the byte budget chose (metrics.json ``allocation.budget``; --dry-run and inspect render it).

    ``total_bytes`` = ``fixed_bytes`` (every stored tensor outside the targets, tied ones once) + Σ the
    modules' ``bytes``: the bytes of the model's state dict after the run, exactly."""

    given: str                         # the recipe's size, as written ("140 MiB", "3.0 bits per weight", ...)
    budget_bytes: int                  # the whole model's budget (bits per weight: fixed + the targets' share)
    fixed_bytes: int
    target_budget_bytes: int
    target_bytes: int
    total_bytes: int
    target_weights: int                # weight values of the targets (bits per weight = 8·target_bytes / this)
    solver: str
    estimated_loss: float
    lower_bound: float
    choices: list[str] = field(default_factory=list)
    modules: list[BudgetedModule] = field(default_factory=list)
    seconds: float = 0.0
    # per choice, the model's bytes and the estimated loss if every module took it (the uniform recipes)
    uniform: dict[str, tuple[int, float]] = field(default_factory=dict)
    prices_cache: str | None = None     # where the prices are kept (None: not kept)
    prices_reused: bool = False         # taken from there instead of priced by this run

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.target_bytes / max(self.target_weights, 1)

    def by_choice(self) -> dict[str, tuple[int, int]]:
        """choice label → (modules, bytes), in the order the recipe lists the choices."""
        counts = {label: (0, 0) for label in self.choices}
        for m in self.modules:
            n, b = counts.get(m.choice, (0, 0))
            counts[m.choice] = (n + 1, b + m.bytes)
        return {label: value for label, value in counts.items() if value[0]}


def state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor of the model's state dict, shared (tied) tensors once."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def allocate_bytes(walk: LayerWalk, stage: Stage, cache_key: dict[str, Any] | None = None) -> ByteBudgetResult:
    """Price every choice, solve the knapsack, bind the choices to ``stage``'s ``BudgetCompressor``.

    ``cache_key``: what the prices depend on (the model's files, the calibration windows, the choices,
    the targets, ...; the runner builds it). With one, the prices are kept under ``$LRCOMPRESS_CACHE/
    budget-prices`` and a later run or dry run of the same key at another size only solves the knapsack."""
    started = time.perf_counter()
    budget: BudgetCompressor = stage.compressor       # type: ignore[assignment]
    spec, adapter = budget.spec, walk.adapter
    names = [f"{adapter.layer_prefix(i)}.{n}" for i, layer in enumerate(adapter.decoder_layers(walk.model))
             for n in stage.select(layer, adapter.layer_prefix(i))]
    if not names:
        raise LrcompressError("budget: its targets match no module of the model")
    _check_reachable(walk.model, budget, names, spec)
    cached = _cache_file(cache_key)
    priced = _read_prices(cached, names)
    reused = priced is not None
    if priced is None:
        diagonals, _ = output_diagonals(walk, names)
        priced, _ = price_choices(walk, stage, diagonals)
        if cached is not None and walk.settings.collective.is_writer:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cached, json.dumps([asdict(p) for p in priced]))
    else:
        walk.observer.phase(f"byte budget: the choices' prices from {cached}")
    fixed = state_bytes(walk.model) - sum(p.dense_bytes for p in priced)
    weights = sum(p.weights for p in priced)
    total, given = spec.total_bytes(fixed, weights)
    solution = solve([p.costs for p in priced], [p.losses for p in priced], total - fixed, spec.solver)
    budget.chosen = {p.name: pick for p, pick in zip(priced, solution.picks)}
    budget.priced_bytes = {p.name: p.costs[pick] for p, pick in zip(priced, solution.picks)}
    labels = [choice.label for choice in budget.choices]
    modules = [BudgetedModule(p.name, p.kind, p.layer, labels[pick], p.costs[pick], p.dense_bytes, p.losses[pick],
                              p.weights) for p, pick in zip(priced, solution.picks)]
    return ByteBudgetResult(given=given, budget_bytes=total, fixed_bytes=fixed, target_budget_bytes=total - fixed,
                            target_bytes=solution.bytes, total_bytes=fixed + solution.bytes, target_weights=weights,
                            solver=solution.solver, estimated_loss=solution.loss, lower_bound=solution.lower_bound,
                            choices=labels, modules=modules, seconds=time.perf_counter() - started,
                            uniform={label: (fixed + sum(p.costs[j] for p in priced), sum(p.losses[j] for p in priced))
                                     for j, label in enumerate(labels)},
                            prices_cache=str(cached) if cached is not None else None,
                            prices_reused=reused)


def planned_bytes(compressor: Compressor, module: nn.Module) -> int:
    """The bytes ``compressor``'s plan says the module will store (no statistics, no weights read)."""
    plan = compressor.plan(module)
    return plan.bytes_after if plan.bytes_after is not None else plan.params_after * module.weight.element_size()


def _check_reachable(model: nn.Module, budget: BudgetCompressor, names: list[str], spec: Any) -> None:
    """Refuse a budget below every module's cheapest planned choice before any pre-pass runs (the pricing
    measures the same bytes again; ``solve`` checks them exactly)."""
    modules = [model.get_submodule(name) for name in names]
    dense = sum(storage_bytes(m) for m in modules)
    fixed = state_bytes(model) - dense
    total, given = spec.total_bytes(fixed, sum(m.weight.numel() for m in modules))
    # a chain stores at least what its first step does, or what its plan says (less when it quantizes factors)
    least = sum(min(min(planned_bytes(c, m), planned_bytes(c.steps[0], m)) if isinstance(c, ChainCompressor)
                    else planned_bytes(c, m) for c in budget.compressors) for m in modules)
    if fixed + least > total:
        raise LrcompressError(f"budget: {given} ({total:,} bytes) is below the smallest model these choices make: "
                              f"{fixed + least:,} bytes ({(fixed + least) / MIB:.2f} MiB: {fixed:,} outside the "
                              f"targets + {least:,} for the {len(names)} targets at their cheapest choice)")


def _cache_file(key: dict[str, Any] | None) -> Path | None:
    if key is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_root() / "budget-prices" / f"{digest}.json"


def _read_prices(path: Path | None, names: list[str]) -> list[Priced] | None:
    """The kept prices of exactly these modules, or None (no file, unreadable, other modules)."""
    if path is None or not path.is_file():
        return None
    try:
        priced = [Priced(**entry) for entry in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None
    return priced if [p.name for p in priced] == names else None


def budget_stage(stages: list[Stage]) -> Stage | None:
    """The stage a recipe's ``budget`` section became, if any."""
    return next((s for s in stages if isinstance(s.compressor, BudgetCompressor)), None)


__all__ = ["BudgetCompressor", "ChainCompressor", "BudgetedModule", "ByteBudgetResult", "Choice", "allocate_bytes", "budget_stage",
           "estimated_loss", "lp_bound", "output_diagonals", "price_choices", "solve", "solve_dp", "solve_greedy",
           "state_bytes"]
