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
from lrcompress.compressor.linalg import GramMetric
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
    spectrum = whitened_spectrum(weight, gram, GramMetric(damping=0.0), "test", d)
    factor = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(weight @ factor, full_matrices=False)
    for dropped in ([4], [1, 3], [0, 2, 4]):
        keep = [i for i in range(len(s)) if i not in dropped]
        approx = (u[:, keep] * s[keep]) @ vh[keep] @ torch.linalg.inv(factor)
        error = (approx - weight) @ x.T                                       # m × tokens
        exact = 0.5 * float((error.square() * d[:, None]).sum())
        assert 0.5 * float(spectrum.scores()[dropped].sum()) == pytest.approx(exact, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Uneven prices: a step may cost more than the one before it (CoSpaDi: when k = ρ·s crosses a power of
# two, every stored index grows by a bit), so the allocation prices each rank at its exact size.


def _priced(name: str, steps: list[int], sigma2: list[float], gain: list[float], floor: int = 1) -> BudgetModule:
    """A module whose step r → r + 1 costs ``steps[r]``."""
    cumulative = [0] + list(itertools.accumulate(steps))
    knob = RankKnob(step_params=steps[0], max_rank=len(steps), rank=floor, budget_params=float(cumulative[floor]),
                    dense_params=cumulative[-1], price=cumulative.__getitem__)
    spectrum = ModuleSpectrum(torch.tensor(sigma2, dtype=torch.float64), torch.tensor(gain, dtype=torch.float64))
    return BudgetModule(name, name.split(".")[-1], int(name.split(".")[1]), knob, floor, len(steps), spectrum)


def _priced_brute_force(modules: list[BudgetModule], budget: float) -> float:
    best = math.inf
    for ranks in itertools.product(*[range(m.floor, m.ceiling + 1) for m in modules]):
        if sum(m.knob.params(r) for r, m in zip(ranks, modules)) <= budget:
            best = min(best, sum(float(m.spectrum.scores()[r:].sum()) for r, m in zip(ranks, modules)))
    return best


def _random_priced(seed: int) -> list[BudgetModule]:
    g = torch.Generator().manual_seed(seed)
    modules = []
    for i in range(3):
        base = int(torch.randint(5, 15, (1,), generator=g))
        jump = int(torch.randint(1, 5, (1,), generator=g))        # from this step on every step costs more
        steps = [base + (extra if r >= jump else 0) for r, extra in
                 enumerate(torch.randint(0, 2 * base, (5,), generator=g).tolist())]
        sigma2 = (torch.rand(5, generator=g).sort(descending=True).values * 10).tolist()
        gain = (0.05 + torch.rand(5, generator=g)).tolist()
        modules.append(_priced(f"layer.{i}.q", steps, sigma2, gain))
    return modules


@pytest.mark.parametrize("seed", range(12))
def test_global_with_uneven_prices_stays_in_the_budget_and_near_the_optimum(seed):
    """Against brute force over every rank choice, with the exact prices: the greedy never overspends,
    leaves no step that still fits, and loses at most one hull segment's score against the optimum (it
    takes the segments in the order of the fractional optimum and cuts at most where the budget ends)."""
    modules = _random_priced(seed)
    floors = sum(m.knob.params(m.floor) for m in modules)
    top = sum(m.knob.params(m.ceiling) for m in modules)
    for budget in torch.linspace(floors, top, 7).tolist():
        ranks = allocate_global(modules, budget)
        used = sum(m.knob.params(r) for r, m in zip(ranks, modules))
        assert used <= budget
        assert all(r == m.ceiling or used - m.knob.params(r) + m.knob.params(r + 1) > budget
                   for r, m in zip(ranks, modules))
        got = sum(float(m.spectrum.scores()[r:].sum()) for r, m in zip(ranks, modules))
        biggest = max(float(m.spectrum.scores()[m.floor:].sum()) for m in modules)
        best = _priced_brute_force(modules, budget)
        assert best - 1e-9 <= got <= best + biggest + 1e-9


def test_global_prices_the_step_that_widens_the_indices():
    """Module a's third step costs 30 (its indices widen), b's steps 10 each. Priced at 10 a step, every
    component fits (6 steps of 10 in 60) and the ranks [3, 3] store 80; priced exactly, a's third component
    costs 3.5 for 30, and the optimum keeps b's (2 and 1.9 for 10 each) instead."""
    a = _priced("layer.0.a", [10, 10, 30], [5.0, 4.0, 3.5], [1.0] * 3)
    b = _priced("layer.1.b", [10, 10, 10], [5.0, 2.0, 1.9], [1.0] * 3)
    ranks = allocate_global([a, b], 60.0)
    assert ranks == [2, 3]
    assert a.knob.params(3) + b.knob.params(3) == 80
    assert sum(float(m.spectrum.scores()[r:].sum()) for r, m in zip(ranks, [a, b])) == _priced_brute_force([a, b], 60.0)


def test_spectrum_fits_exact_prices():
    modules = _random_priced(3)
    budget = sum(m.knob.params(m.floor) for m in modules) + 40.0
    ranks = allocate_spectrum(modules, budget)
    used = sum(m.knob.params(r) for r, m in zip(ranks, modules))
    assert used <= budget
    assert all(r == m.ceiling or used - m.knob.params(r) + m.knob.params(r + 1) > budget
               for r, m in zip(ranks, modules))


@pytest.mark.parametrize("method", ["cospadi", "compot"])
def test_a_dictionary_methods_price_is_what_the_finished_module_stores(method):
    """The knob's price at every s is the stored size of the module the method builds at that s, including
    the steps where k crosses a power of two (k = 2s: s = 16 → 17 takes 32 atoms, 5-bit indices, to 34,
    6-bit) and, for compot, where k reaches its cap d_in = 40."""
    from helpers import observed_linear

    from lrcompress.compressor import get_compressor

    cls = get_compressor(method)
    _, linear, gram = observed_linear(300, 48, 40)
    compressor = cls(cls.Config(ratio=0.3, iterations=1))
    knob = compressor.rank_knob(linear)
    widths = set()
    for s in sorted({15, 16, 17, 18, 21, knob.max_rank}):
        module = compressor.with_rank(s).compress("m", linear, {"gram": gram}).module
        widths.add(module.packed_indices.numel() * 8 // module.indices.numel())
        assert module.storage_bytes() == knob.params(s) * 8 - _padding(module)
    assert len(widths) > 1                                                # the test crossed a width
    assert knob.params(knob.max_rank) < 48 * 40 <= knob.params(knob.max_rank + 1)


def _padding(module) -> int:
    """Bytes by which the packed indices fall short of whole float64 values (the price counts values)."""
    return (-module.packed_indices.numel()) % module.values.element_size()


def test_a_cospadi_global_budget_holds_for_the_bytes_the_finished_modules_store(tiny_llama_dir, calibration_file,
                                                                               tmp_path, no_report):
    """The budget against the checkpoint bytes of the replacements (not the allocator's own arithmetic):
    at 0.3 the allocation takes some modules' dictionaries across a power of two (wider indices)."""
    from tiny_runs import tiny_recipe

    from lrcompress.compressor import get_compressor
    from lrcompress.modules import storage_bytes
    from lrcompress.modules.base import compressed_modules
    from lrcompress.modules.sparse_dict import index_bits
    from lrcompress.runner import run_recipe

    stage = {"method": "cospadi", "ratio": 0.3, "iterations": 1, "allocation": {"strategy": "global", "floor": 0.2}}
    result = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", stages=[stage]))
    summary = result.metrics.allocation.stages[0]
    replaced = dict(compressed_modules(result.model))
    assert sorted(replaced) == sorted(m.name for m in summary.modules)
    itemsize = 4                                                            # the tiny model is float32
    stored = sum(storage_bytes(module) for module in replaced.values())
    assert stored <= summary.budget_params * itemsize
    cls = get_compressor("cospadi")
    knob = {name: cls(cls.Config(ratio=0.3)).rank_knob(torch.nn.Linear(module.in_features, module.out_features,
                                                                       bias=False))
            for name, module in replaced.items()}
    next_steps = [(knob[m.name].params(m.rank + 1) - knob[m.name].params(m.rank)) * itemsize for m in summary.modules
                  if m.rank < m.ceiling]
    assert summary.budget_params * itemsize - stored < max(next_steps)      # spent within one step
    uniform_bits = {m.name: index_bits(max(m.uniform_rank, 2 * m.uniform_rank)) for m in summary.modules}
    assert any(index_bits(replaced[name].atoms) > bits for name, bits in uniform_bits.items())


def test_global_allocation_with_output_matching_honours_both(tiny_llama_dir, calibration_file, tmp_path, no_report):
    """The configuration of RESULTS' best low-rank row (whiten, `global`, `target: original`) on a tiny model:
    the allocated ranks are the ones built, every module is fitted to the original outputs, the records agree
    with the modules, and matching lowers the final output error at the same ranks."""
    from tiny_runs import tiny_recipe

    from lrcompress.models import load_model
    from lrcompress.runner import run_recipe

    stage = {"method": "whiten", "ratio": 0.4, "allocation": "global"}
    runs = {target: run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / target, stages=[stage],
                                           runtime={"device": "cpu", "batch_size": 3, "sequential": True,
                                                    "target": target}))
            for target in ("layer", "original")}
    matched = runs["original"]
    summary = matched.metrics.allocation.stages[0]
    chosen = {m.name: m.rank for m in summary.modules}
    assert len(set(chosen.values())) > 1                                  # not the uniform ranks
    assert chosen == {m.name: m.rank for m in runs["layer"].metrics.allocation.stages[0].modules}
    records = {r.name: r for r in matched.metrics.modules}
    assert {name: r.rank for name, r in records.items()} == chosen
    assert all(r.details["target"] == "original" for r in records.values())
    assert matched.metrics.output_matching is not None and matched.metrics.output_matching.reference_forwards > 0
    for name, record in records.items():
        module = matched.model.get_submodule(name)
        assert module.rank == chosen[name]
        assert record.params_after == module.stored_params() == chosen[name] * (module.in_features +
                                                                                module.out_features)
    assert summary.allocated_params == sum(r.params_after for r in records.values()) <= summary.budget_params
    dense = load_model(str(tiny_llama_dir)).model
    windows = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(1))

    def final_hidden(model):
        with torch.no_grad():
            return model(input_ids=windows, use_cache=False, output_hidden_states=True).hidden_states[-1]

    reference = final_hidden(dense)
    errors = {t: float((final_hidden(run.model) - reference).norm() / reference.norm()) for t, run in runs.items()}
    assert errors["original"] < errors["layer"]


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


def test_the_budget_ranks_the_spectrum_in_the_metric_the_method_truncates_in():
    """A stage with Gram shrinkage is priced on the spectrum of W·chol((1−α)G + α·Diag G), not of W·chol(G)."""
    from lrcompress.compressor.lord import LoRDConfig
    from lrcompress.compressor.whiten import WhitenConfig

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    gram = x.T @ x
    shrunk = 0.6 * gram + 0.4 * torch.diag(torch.diagonal(gram))
    expected = torch.linalg.svdvals(weight @ torch.linalg.cholesky(shrunk)).square()
    spectrum = whitened_spectrum(weight, gram, GramMetric(damping=0.0, shrinkage=0.4), "test")
    torch.testing.assert_close(spectrum.sigma2, expected, rtol=1e-10, atol=1e-12)
    assert GramMetric.of(WhitenConfig(ratio=0.2, damping=1e-3, shrinkage=0.4)) == GramMetric(1e-3, 0.4)
    assert GramMetric.of(LoRDConfig(ratio=0.2, shrinkage=0.3)) == GramMetric(shrinkage=0.3)
