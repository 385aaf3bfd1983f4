"""Budget allocation: the budget is met within a rank step, bounds hold, uniform is today's run, the
greedy is optimal where the optimum is known, and the K-FAC score is the exact loss of a quadratic."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lrcompress.compressor import RankKnob
from lrcompress.pipeline.allocation import (BudgetModule, allocate_global, allocate_spectrum, allocate_uniform,
                                            fit_to_budget)
from lrcompress.pipeline.spectra import ModuleSpectrum, whitened_spectrum


def _module(name: str, kind: str, step: int, max_rank: int, rank: int, sigma2: list[float],
            gain: list[float] | None = None, floor: int = 1, ceiling: int | None = None) -> BudgetModule:
    dense = step * max_rank
    knob = RankKnob(step_params=step, max_rank=max_rank, rank=rank, budget_params=float(rank * step) + 0.5 * step,
                    dense_params=dense)
    spectrum = ModuleSpectrum(torch.tensor(sigma2, dtype=torch.float64),
                              None if gain is None else torch.tensor(gain, dtype=torch.float64))
    return BudgetModule(name, kind, int(name.split(".")[1]), knob, floor, ceiling or max_rank, spectrum)


def _random_modules(seed: int, count: int = 12) -> list[BudgetModule]:
    g = torch.Generator().manual_seed(seed)
    modules = []
    for i in range(count):
        kind = ["q", "k", "mlp"][i % 3]
        step, max_rank = {"q": (10, 5), "k": (7, 4), "mlp": (13, 9)}[kind]
        sigma = torch.rand(max_rank, generator=g).sort(descending=True).values * (1 + 50 * torch.rand(1, generator=g))
        gain = (0.1 + torch.rand(max_rank, generator=g)).tolist()
        modules.append(_module(f"layer.{i}.{kind}", kind, step, max_rank, max(1, max_rank // 2),
                               (sigma.square() * 1e4).tolist(), gain, floor=1, ceiling=max_rank - 1))
    return modules


@pytest.mark.parametrize("allocator", [allocate_spectrum, allocate_global])
@pytest.mark.parametrize("seed", range(5))
def test_the_budget_is_met_within_one_rank_step_and_bounds_hold(allocator, seed):
    modules = _random_modules(seed)
    budget = sum(m.knob.budget_params for m in modules)
    ranks = allocator(modules, budget)
    used = sum(r * m.knob.step_params for r, m in zip(ranks, modules))
    assert used <= budget
    # No module below its ceiling has a step that still fits: the budget is met within one step.
    assert all(r == m.ceiling or used + m.knob.step_params > budget for r, m in zip(ranks, modules))
    assert all(m.floor <= r <= m.ceiling for r, m in zip(ranks, modules))


def test_fit_to_budget_removes_steps_when_the_targets_overshoot():
    modules = _random_modules(0)
    budget = sum(m.knob.budget_params for m in modules)
    ranks = fit_to_budget(modules, [float(m.ceiling) for m in modules], budget)
    used = sum(r * m.knob.step_params for r, m in zip(ranks, modules))
    assert used <= budget < used + max(m.knob.step_params for m in modules)


def test_floors_above_the_budget_are_a_clear_error():
    modules = [_module(f"layer.{i}.q", "q", 10, 5, 2, [4.0, 3, 2, 1, 0.5], floor=4) for i in range(3)]
    with pytest.raises(Exception, match="floors alone"):
        allocate_spectrum(modules, 3 * 25.0)


def test_uniform_keeps_every_methods_own_rank():
    modules = _random_modules(1)
    assert allocate_uniform(modules, 0.0) == [m.knob.rank for m in modules]


def test_spectrum_follows_the_svd_llm_v2_rule_within_a_group():
    """Equal shapes: removed share ∝ 1/log L_i, the group's total removed unchanged."""
    spectra = [[1e6, 1e5, 1e4, 1e3], [1e8, 1e7, 1e6, 1e5], [1e4, 1e3, 1e2, 1e1]]
    modules = [_module(f"layer.{i}.q", "q", 100, 4, 2, s, floor=1, ceiling=4) for i, s in enumerate(spectra)]
    budget = sum(m.knob.budget_params for m in modules)
    ranks = allocate_spectrum(modules, budget)
    losses = [math.sqrt(sum(s[2:])) for s in spectra]
    # the highest truncation loss keeps the most, the lowest the least
    assert ranks[losses.index(max(losses))] == max(ranks) and ranks[losses.index(min(losses))] == min(ranks)


def _brute_force(modules: list[BudgetModule], budget: float) -> float:
    """The smallest Σ of dropped scores over every prefix choice that fits the budget."""
    best = math.inf
    for ranks in itertools.product(*[range(m.floor, m.ceiling + 1) for m in modules]):
        if sum(r * m.knob.step_params for r, m in zip(ranks, modules)) <= budget:
            best = min(best, sum(float(m.spectrum.scores()[r:].sum()) for r, m in zip(ranks, modules)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_global_greedy_finds_the_optimum_with_equal_steps(seed):
    """With one price per step and decreasing scores per module the greedy is exactly optimal."""
    g = torch.Generator().manual_seed(seed)
    modules = []
    for i in range(3):
        sigma2 = (torch.rand(5, generator=g).sort(descending=True).values * 10).tolist()
        gain = (0.05 + torch.rand(5, generator=g)).sort(descending=True).values.tolist()
        modules.append(_module(f"layer.{i}.q", "q", 10, 5, 2, sigma2, gain, floor=1, ceiling=5))
    budget = 10 * 8.0
    ranks = allocate_global(modules, budget)
    got = sum(float(m.spectrum.scores()[r:].sum()) for r, m in zip(ranks, modules))
    assert got == pytest.approx(_brute_force(modules, budget))


def test_global_looks_past_a_cheap_component_to_a_dear_one():
    """Scores need not decrease along a module's spectrum (u_iᵀ G_y u_i varies). Module a's second
    component is cheap to drop but its third is dear; a compressor keeps a prefix, so keeping the
    third means keeping the second: the concave hull sees that, a per-component greedy would not."""
    a = _module("layer.0.a", "a", 10, 3, 1, [1.0, 0.1, 5.0], [1.0] * 3, floor=1, ceiling=3)
    b = _module("layer.1.b", "b", 10, 3, 1, [2.0, 2.0, 2.0], [1.0] * 3, floor=1, ceiling=3)
    assert allocate_global([a, b], 40.0) == [3, 1]
    assert _brute_force([a, b], 40.0) == pytest.approx(2 * 2.0)


def test_global_keeps_the_components_that_cost_the_loss_most():
    """A constructed problem: module a's components are cheap to drop (small σ²·gain), module b's are
    dear; with room for 6 of 8 ranks above the floors, b keeps everything and a gives up the rest."""
    a = _module("layer.0.a", "a", 10, 4, 2, [1.0, 0.5, 0.2, 0.1], [1.0] * 4, floor=1, ceiling=4)
    b = _module("layer.1.b", "b", 10, 4, 2, [9.0, 8.0, 7.0, 6.0], [1.0] * 4, floor=1, ceiling=4)
    assert allocate_global([a, b], 60.0) == [2, 4]


def test_kfac_score_is_the_exact_loss_increase_of_a_kronecker_quadratic():
    """L(W') = ½ Σ_t (W'x_t − Wx_t)ᵀ D (W'x_t − Wx_t) with D diagonal: dropping any set of whitened
    components raises L by ½ Σ σ_i²·u_iᵀ D u_i, additive over components."""
    g = torch.Generator().manual_seed(0)
    m, n, tokens = 6, 5, 40
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    d = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    gram = x.T @ x
    spectrum = whitened_spectrum(weight, gram, 0.0, "test", d)
    factor = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(weight @ factor, full_matrices=False)
    for dropped in ([4], [1, 3], [0, 2, 4]):
        keep = [i for i in range(len(s)) if i not in dropped]
        approx = (u[:, keep] * s[keep]) @ vh[keep] @ torch.linalg.inv(factor)
        error = (approx - weight) @ x.T                                       # m × tokens
        exact = 0.5 * float((error.square() * d[:, None]).sum())
        assert 0.5 * float(spectrum.scores()[dropped].sum()) == pytest.approx(exact, rel=1e-9)


def test_allocate_returns_new_stages_and_leaves_the_given_ones_as_they_were():
    from helpers import tiny_model
    from lrcompress.compressor import get_compressor
    from lrcompress.models import adapter_for
    from lrcompress.pipeline import LayerWalk, PipelineSettings, Stage
    from lrcompress.pipeline.allocation import AllocatedCompressor, allocate
    from lrcompress.recipe import AllocationSpec

    model = tiny_model("llama")
    cls = get_compressor("whiten")
    budgeted = Stage(0, cls(cls.Config(ratio=0.3)), ["*.mlp.*"], [], AllocationSpec(strategy="spectrum", floor=0.2))
    uniform = Stage(1, cls(cls.Config(ratio=0.3)), ["*.self_attn.*"], [])
    given = [budgeted, uniform]
    windows = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))
    stages, result = allocate(LayerWalk(model, adapter_for(model), windows, PipelineSettings(batch_size=2)), given)
    assert result is not None and len(result.stages) == 1
    assert isinstance(stages[0].compressor, AllocatedCompressor) and stages[0] is not budgeted
    assert stages[1] is uniform
    assert not isinstance(budgeted.compressor, AllocatedCompressor)     # the caller's stage is untouched
