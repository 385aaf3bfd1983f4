"""The byte budget: the knapsack against brute force, the loss estimate against its definition, and a
tiny model's run whose stored bytes are the planned bytes to the byte."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from lrcompress.errors import LrcompressError
from lrcompress.pipeline import bytebudget
from lrcompress.pipeline.bytebudget import estimated_loss, lp_bound, solve, solve_dp, solve_greedy, state_bytes


def _brute_force(costs: list[list[int]], losses: list[list[float]], budget: int) -> float:
    best = float("inf")
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[p] for c, p in zip(costs, picks)) <= budget:
            best = min(best, sum(row[p] for row, p in zip(losses, picks)))
    return best


def _instance(seed: int, modules: int = 5, choices: int = 4) -> tuple[list[list[int]], list[list[float]]]:
    """Random choices, deliberately not convex, some dominated (more bytes, more loss), sizes sharing a
    common factor (as packed codes do) so that the table works in units above one byte."""
    rng = random.Random(seed)
    costs, losses = [], []
    for _ in range(modules):
        c = sorted(rng.sample(range(1, 60), choices))
        costs.append([8 * v for v in c])
        losses.append([rng.uniform(0, 10) / (1 + v / 20) for v in c])
    return costs, losses


def _totals(costs, losses, picks):
    return sum(c[p] for c, p in zip(costs, picks)), sum(row[p] for row, p in zip(losses, picks))


@pytest.mark.parametrize("seed", range(6))
def test_the_exact_solver_is_the_brute_force_optimum_at_every_budget(seed):
    costs, losses = _instance(seed)
    least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for budget in (least, least + 13, (least + most) // 2, most - 9, most):
        picks = solve_dp(costs, losses, budget)
        used, loss = _totals(costs, losses, picks)
        assert used <= budget
        assert loss == pytest.approx(_brute_force(costs, losses, budget), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_the_greedy_is_feasible_and_between_the_optimum_and_one_hull_step_above_the_lp_bound(seed):
    costs, losses = _instance(seed, modules=6)
    least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
    widest = max(max(row) - min(row) for row in losses)
    for budget in (least + 40, (least + most) // 2, most - 40):
        used, loss = _totals(costs, losses, solve_greedy(costs, losses, budget))
        optimum, bound = _brute_force(costs, losses, budget), lp_bound(costs, losses, budget)
        assert used <= budget
        assert bound <= optimum + 1e-9 <= loss + 2e-9
        assert loss - bound <= widest


def test_the_hull_looks_past_a_choice_that_is_a_poor_use_of_its_bytes():
    # The middle choice saves 0.1 for 10 bytes; the last saves 10 for 20: a greedy on the next step alone
    # would see the first step as poor and stop there, the hull sees the two-step saving of 10.1 per 20.
    costs, losses = [[10, 20, 30], [10, 30]], [[10.0, 9.9, 0.0], [5.0, 4.0]]
    picks = solve_greedy(costs, losses, 50)
    assert picks == [2, 0]
    assert solve_dp(costs, losses, 50) == [2, 0]


def test_a_budget_below_the_cheapest_choices_names_the_bytes_needed():
    with pytest.raises(LrcompressError, match="needs 40 bytes"):
        solve([[10, 20], [30, 40]], [[1.0, 0.0], [1.0, 0.0]], 39)


def test_auto_falls_back_to_the_greedy_when_the_table_is_too_large(monkeypatch):
    costs, losses = _instance(1)
    monkeypatch.setattr(bytebudget, "DP_CELLS", 10)
    solution = solve(costs, losses, sum(min(c) for c in costs) + 200)
    assert solution.solver == "hull-greedy" and solution.lower_bound <= solution.loss


def test_the_estimate_is_the_gradient_weighted_output_error_it_claims():
    g = torch.Generator().manual_seed(0)
    weight, approx = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    x, d = torch.randn(40, 7, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    direct = float(((x @ (weight - approx).T).square() * d).sum())   # Σ_t Σ_j d_j ((W − Ŵ) x_t)_j²
    assert estimated_loss(weight, approx, x.T @ x, d) == pytest.approx(direct, rel=1e-10)


def _budget_recipe(model_dir, text, out, bits_per_weight: float, **extra):
    from tiny_runs import tiny_recipe

    budget = {"bits_per_weight": bits_per_weight, "targets": ["*.self_attn.k_proj", "*.self_attn.o_proj", "*.mlp.down_proj"],
              "choices": [{"method": "rtn", "bits": [2, 4], "group_size": 16}, {"method": "whiten", "rank": 4},
                          {"method": "rtn", "bits": 2, "group_size": 16, "then": [{"method": "eora", "rank": 2}]}],
              **extra}
    return tiny_recipe(model_dir, text, out, stages=[], budget=budget)


def _capture_prices(monkeypatch) -> tuple[dict, object]:
    """The measured prices and budget the run hands the solver (filled when it runs), and the solver itself."""
    seen = {}
    original = bytebudget.solve

    def capturing(costs, losses, budget, solver="auto"):
        seen.update(costs=costs, losses=losses, budget=budget)
        return original(costs, losses, budget, solver)

    monkeypatch.setattr(bytebudget, "solve", capturing)
    return seen, original


def test_the_choice_on_a_tiny_model_is_the_brute_force_optimum_over_its_priced_choices(
        tiny_llama_dir, calibration_file, tmp_path, monkeypatch):
    """Six modules, four choices each (rtn 2-bit, rtn 4-bit, whiten rank 4, rtn 2-bit + EoRA rank 2): the
    run's choice and the solver at other budgets against all 4096 combinations of the measured prices."""
    from lrcompress.runner import run_recipe

    seen, original = _capture_prices(monkeypatch)
    result = run_recipe(_budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", 4.5), dry_run=True)
    budget = result.metrics.allocation.budget
    costs, losses = seen["costs"], seen["losses"]
    assert len(costs) == 6 and all(len(c) == 4 for c in costs)
    assert len({m.choice for m in budget.modules}) > 1          # the budget mixes choices: a real test
    assert budget.estimated_loss == pytest.approx(_brute_force(costs, losses, seen["budget"]), rel=1e-12)
    assert budget.target_bytes <= budget.target_budget_bytes
    for j, label in enumerate(budget.choices):     # the uniform recipes: every module at one choice
        assert budget.uniform[label] == (budget.fixed_bytes + sum(c[j] for c in costs),
                                         pytest.approx(sum(row[j] for row in losses)))
    least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for target in (least, least + (most - least) // 3, (least + most) // 2, most):
        for name in ("dp", "greedy"):
            solution = original(costs, losses, target, name)
            assert solution.bytes <= target
            optimum = _brute_force(costs, losses, target)
            if name == "dp":
                assert solution.loss == pytest.approx(optimum, rel=1e-12)
            else:
                assert solution.loss >= optimum * (1 - 1e-12)
    assert [p.method for p in result.plan] == [m.choice.split(" ")[0] + ("+eora" if "eora" in m.choice else "")
                                               for m in budget.modules]
    assert [p.bytes_after for p in result.plan] == [m.bytes for m in budget.modules]    # the plan shows the prices


@pytest.mark.parametrize("tied", [False, True])
def test_the_checkpoint_stores_the_planned_bytes_to_the_byte(tiny_llama_dir, tied_dir, calibration_file, tmp_path,
                                                            no_report, tied):
    import lrcompress
    from lrcompress.runner import run_recipe

    model_dir = tied_dir if tied else tiny_llama_dir
    recipe = _budget_recipe(model_dir, calibration_file, tmp_path / "run", 4.5)
    dense = state_bytes(lrcompress.load(str(model_dir)))
    run = run_recipe(recipe)
    budget = run.metrics.allocation.budget
    loaded = lrcompress.load(str(tmp_path / "run"))
    counted = state_bytes(loaded)                                   # every tensor of the state dict, tied ones once
    assert counted == budget.total_bytes <= budget.budget_bytes
    assert budget.fixed_bytes == dense - sum(m.dense_bytes for m in budget.modules)
    assert _tensor_bytes_on_disk(tmp_path / "run") == counted
    chosen = {m.name: m for m in budget.modules}
    assert {r.name: r.bytes_after for r in run.metrics.modules} == {n: m.bytes for n, m in chosen.items()}
    assert all(r.details["choice"] == chosen[r.name].choice for r in run.metrics.modules)
    assert {m.choice for m in budget.modules} >= {"rtn bits=2 group_size=16 + eora rank=2"}   # a chain is in the test


def _tensor_bytes_on_disk(directory) -> int:
    """The bytes of every tensor of the checkpoint's safetensors files (their JSON headers left out)."""
    from safetensors import safe_open

    total = 0
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    return total


def test_lazy_mode_refuses_the_byte_budget(tiny_llama_dir, calibration_file, tmp_path):
    from lrcompress.residency import model_class
    from lrcompress.runner import build_stages

    recipe = _budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", 4.5)
    recipe.runtime.lazy = True
    with pytest.raises(LrcompressError, match="output_gradient"):
        model_class(recipe, build_stages(recipe))


def test_a_budget_no_choice_can_meet_is_refused_before_any_pre_pass(tiny_llama_dir, calibration_file, tmp_path,
                                                                      monkeypatch):
    from lrcompress.runner import run_recipe

    monkeypatch.setattr(bytebudget, "output_diagonals", lambda *args: pytest.fail("a pre-pass ran"))
    recipe = _budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", 3.0)   # below rtn 2-bit g16: 3.5
    with pytest.raises(LrcompressError, match=r"below the smallest model these choices make: [\d,]+ bytes"):
        run_recipe(recipe, dry_run=True)


def test_targets_that_match_nothing_name_the_budget_section(tiny_llama_dir, calibration_file, tmp_path):
    from lrcompress.errors import RecipeError
    from lrcompress.runner import run_recipe

    recipe = _budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", 4.5, targets=["*.no_such_proj"])
    with pytest.raises(RecipeError, match=r"^budget: targets \['\*\.no_such_proj'\] match no module.*fix budget\.targets"):
        run_recipe(recipe, dry_run=True)


def test_a_second_size_reuses_the_prices_and_other_choices_do_not(tiny_llama_dir, calibration_file, tmp_path,
                                                                  monkeypatch):
    from lrcompress.runner import run_recipe

    monkeypatch.setenv("LRCOMPRESS_CACHE", str(tmp_path / "cache"))
    first = run_recipe(_budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "a", 4.5), dry_run=True)
    assert not first.metrics.allocation.budget.prices_reused
    monkeypatch.setattr(bytebudget, "output_diagonals", lambda *args: pytest.fail("priced again"))
    second = run_recipe(_budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "b", 6.0), dry_run=True)
    a, b = first.metrics.allocation.budget, second.metrics.allocation.budget
    assert b.prices_reused and b.prices_cache == a.prices_cache
    assert b.uniform == a.uniform and b.target_bytes > a.target_bytes     # same prices, a larger budget spent
    with pytest.raises(BaseException, match="priced again"):             # other choices: other prices
        run_recipe(_budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "c", 6.0,
                                  choices=[{"method": "rtn", "bits": [3, 4], "group_size": 16}]), dry_run=True)


FACTOR_CHOICES = [{"method": "rtn", "bits": [2, 4], "group_size": 16},
                  {"method": "whiten", "rank": [2, 4], "then": [{"method": "gptq", "apply_to": "factors", "bits": 4,
                                                                "group_size": 16}]}]
FACTOR_LABEL = "whiten rank=4 + gptq apply_to=factors bits=4 group_size=16"


def test_a_rank_with_quantized_factors_is_a_choice_priced_and_stored_to_the_byte(
        tiny_llama_dir, calibration_file, tmp_path, no_report, monkeypatch):
    """whiten rank r, then gptq 4-bit on its two factors, as one choice beside rtn: the allocation is the brute
    force optimum of the measured prices, each module stores the bytes it was priced at, and the checkpoint
    loads (lrcompress.load and transformers) with the run's logits."""
    from transformers import AutoModelForCausalLM

    import lrcompress
    from lrcompress.modules import LowRankLinear, storage_bytes
    from lrcompress.runner import run_recipe

    seen, original = _capture_prices(monkeypatch)
    run = run_recipe(_budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", 3.2, choices=FACTOR_CHOICES))
    budget = run.metrics.allocation.budget
    costs, losses = seen["costs"], seen["losses"]
    assert len(costs) == 6 and all(len(c) == 4 for c in costs)
    assert FACTOR_LABEL in budget.choices and any(m.choice == FACTOR_LABEL for m in budget.modules)
    assert len({m.choice for m in budget.modules}) > 1
    assert budget.estimated_loss == pytest.approx(_brute_force(costs, losses, seen["budget"]), rel=1e-12)
    least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for target in (least, (least + most) // 2, most):
        assert original(costs, losses, target, "dp").loss == pytest.approx(_brute_force(costs, losses, target), rel=1e-12)
    loaded = lrcompress.load(str(tmp_path / "run"), kernels=False)
    chosen = {m.name: m for m in budget.modules}
    for name, m in chosen.items():
        module = loaded.get_submodule(name)
        assert storage_bytes(module) == m.bytes
        if m.choice == FACTOR_LABEL:        # a low-rank pair whose two factors are quantized, not float
            assert isinstance(module, LowRankLinear) and not any(
                type(f) is torch.nn.Linear for f in (module.down, module.up))
    assert state_bytes(loaded) == budget.total_bytes <= budget.budget_bytes
    assert _tensor_bytes_on_disk(tmp_path / "run") == budget.total_bytes
    assert {r.name: r.bytes_after for r in run.metrics.modules} == {n: m.bytes for n, m in chosen.items()}
    ids = torch.arange(24).reshape(2, 12) % loaded.config.vocab_size
    with torch.no_grad():
        expected = run.model.eval()(ids).logits
        assert torch.equal(loaded.eval()(ids).logits, expected)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run")).eval()
        assert torch.equal(hf(ids).logits, expected)


def test_a_chain_that_quantizes_factors_plans_the_bytes_it_stores(tiny_llama_dir):
    """The chain's plan (what preflight and the reachability check see before any pricing) is the packed pair,
    not the float pair plus the change a dense 4-bit quantization would make."""
    import lrcompress
    from lrcompress.modules import storage_bytes
    from lrcompress.recipe import parse_recipe
    from lrcompress.runner import build_stages

    recipe = parse_recipe({"model": {"path": str(tiny_llama_dir)}, "budget": {"bits_per_weight": 4, "choices": [
        FACTOR_CHOICES[1]]}})
    chains = build_stages(recipe)[0].compressor.compressors
    module = lrcompress.load(str(tiny_llama_dir)).model.layers[0].mlp.down_proj
    gram = _gram_for(module)
    for chain in chains:
        replacement = chain.compress("down_proj", module, {"gram": gram}).module
        assert bytebudget.planned_bytes(chain, module) == storage_bytes(replacement) < storage_bytes(module) / 4


def test_a_size_only_quantized_factors_reach_is_not_refused(tiny_llama_dir, calibration_file, tmp_path):
    """whiten rank 2 with float factors is larger than the budget, with 4-bit factors smaller: the check before
    the pre-pass must not count the float pair."""
    from lrcompress.runner import run_recipe

    choices = [{"method": "whiten", "rank": 2, "then": [{"method": "gptq", "apply_to": "factors", "bits": 4,
                                                         "group_size": 16}]}]
    run = run_recipe(_budget_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", 1.0, choices=choices),
                     dry_run=True)
    budget = run.metrics.allocation.budget
    assert budget.target_bytes <= budget.target_budget_bytes
    assert all(m.choice.startswith("whiten rank=2 + gptq") for m in budget.modules)


def _gram_for(module: torch.nn.Module):
    from lrcompress.compressor.stats import GramStatistic

    gram = GramStatistic(module.in_features)
    gram.observe(torch.randn(64, module.in_features, generator=torch.Generator().manual_seed(0)), None)
    return gram
