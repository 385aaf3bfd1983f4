"""Sub-MoE's multi-layer allocation (``rank_allocation: layers``) and the shared-subspace rank options: the
greedy allocation (sums to the budget, bounds, optimality), the allocation policy over a pre-pass table,
the recipe validation, and a pipeline run on a tiny 2-layer MoE through the ``expert_spectra`` pre-pass."""
import itertools

import pytest
import torch

from lrcompress.compressor import get_compressor
from lrcompress.compressor.expert_merge import allocate_ranks, spectrum_shares
from lrcompress.compressor.expert_stats import EXPERT_SPECTRA, ExpertSpectraStatistic
from lrcompress.compressor.submoe import allocate_layer_ranks
from lrcompress.errors import LrcompressError
from lrcompress.models import adapter_for
from lrcompress.models.moe import expert_weights
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, run_prepasses
from moe_helpers import MOE_WINDOWS, moe_stage, tiny_moe


def _decreasing(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.rand(n, generator=g, dtype=torch.float64), descending=True).values


def test_allocation_sums_to_the_budget_respects_bounds_and_is_optimal():
    values = [_decreasing(s, n) for s, n in ((0, 6), (1, 4), (2, 5))]
    floors, ceilings = [1, 0, 2], [5, 4, 4]
    for budget in range(sum(floors), sum(ceilings) + 1):
        ranks = allocate_ranks(values, budget, floors, ceilings)
        assert sum(ranks) == budget
        assert all(lo <= r <= hi for r, lo, hi in zip(ranks, floors, ceilings))
        best = max((sum(float(v[:r].sum()) for v, r in zip(values, combo)), combo)
                   for combo in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(floors, ceilings)))
                   if sum(combo) == budget)
        kept = sum(float(v[:r].sum()) for v, r in zip(values, ranks))
        assert kept == pytest.approx(best[0], abs=1e-12)              # brute force over every split


def test_allocation_refuses_impossible_budgets_and_unsorted_values():
    values = [_decreasing(0, 4), _decreasing(1, 4)]
    with pytest.raises(ValueError, match="outside"):
        allocate_ranks(values, 1, [1, 1], [4, 4])
    with pytest.raises(ValueError, match="outside"):
        allocate_ranks(values, 9, [1, 1], [4, 4])
    with pytest.raises(ValueError, match="non-increasing"):
        allocate_ranks([torch.tensor([0.1, 0.5], dtype=torch.float64)], 1, [0], [2])


def _table(model):
    table = {}
    for i, layer in enumerate(model.model.layers):
        ExpertSpectraStatistic.of_block(f"model.layers.{i}.mlp", layer.mlp, table)
    return table


def _two_layers(redundant: int):
    """A 2-layer Mixtral; the experts of layer ``redundant`` share a 4-dimensional output subspace per weight
    type (W_i = U·B_i + a little noise): few shared triplets hold nearly all of that layer's union energy."""
    model = tiny_moe("mixtral", num_local_experts=4, num_hidden_layers=2)
    block = model.model.layers[redundant].mlp
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for weight in (block.experts.gate_up_proj, block.experts.down_proj):
            e, out, inp = weight.shape
            basis = torch.randn(out, 4, generator=g)
            weight.copy_(basis @ torch.randn(e, 4, inp, generator=g) + 1e-3 * torch.randn(weight.shape, generator=g))
    return model


@pytest.mark.parametrize("redundant", [0, 1])
def test_layers_allocation_gives_the_redundant_layer_less_and_keeps_the_budget(redundant):
    model = _two_layers(redundant)
    table = _table(model)
    dense = allocate_layer_ranks(table, 0.5, None, 0.1)
    ceilings = {(n, k): min(table[n].shapes[k]) for n in table for k in table[n].spectra}
    assert sum(r for ranks in dense.values() for r in ranks.values()) == round(0.5 * sum(ceilings.values()))
    assert all(max(1, int(0.1 * ceilings[(n, k)] + 0.999)) <= r <= ceilings[(n, k)]
               for n, ranks in dense.items() for k, r in ranks.items())
    other = 1 - redundant
    names = [f"model.layers.{i}.mlp" for i in (redundant, other)]
    for kind in ("gate", "up", "down"):
        assert dense[names[0]][kind] < dense[names[1]][kind]
    dagger = allocate_layer_ranks(table, None, 8, 0.25)
    ranks = {n: set(r.values()) for n, r in dagger.items()}
    assert all(len(r) == 1 for r in ranks.values())                  # one rank per block (all weight types)
    (low,), (high,) = ranks[names[0]], ranks[names[1]]
    assert low + high == 16 and low < high and low >= 2
    with pytest.raises(LrcompressError, match="below the floors"):
        allocate_layer_ranks(table, 0.05, None, 0.5)


def test_spectrum_shares_are_the_experts_mean_energy_shares():
    w = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.stack([torch.linalg.svdvals(e).pow(2) / e.pow(2).sum() for e in w]).mean(0)
    shares = spectrum_shares(torch.cat([w, torch.zeros(1, 5, 4, dtype=torch.float64)]))     # a zero expert adds 0
    torch.testing.assert_close(shares, expected * 3 / 4)
    torch.testing.assert_close(spectrum_shares(w).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_config_validation():
    cls = get_compressor("submoe").Config
    assert cls(num_experts=2, subspace_budget=0.5, rank_allocation="layers").rank_allocation == "layers"
    with pytest.raises(ValueError, match="shares a budget"):
        cls(num_experts=2, rank_allocation="layers")
    with pytest.raises(ValueError, match="shares a budget"):
        cls(num_experts=2, rank_allocation="layers", subspace_rank=4)
    with pytest.raises(ValueError, match="give one"):
        cls(num_experts=2, subspace_budget=0.5, ratio=0.3)
    with pytest.raises(ValueError, match="drop 'subspace_rank'"):
        cls(num_experts=2, subspace_budget=0.5, subspace_energy=0.9)
    with pytest.raises(ValueError, match="no subspace"):
        cls(num_experts=2, merge="regmean", rank_allocation="layers", subspace_budget=0.5)
    with pytest.raises(ValueError):
        cls(num_experts=2, subspace_budget=0.0)
    with pytest.raises(ValueError):
        cls(num_experts=2, subspace_budget=0.5, rank_allocation="global")
    assert EXPERT_SPECTRA in get_compressor("submoe")(cls(num_experts=2, ratio=0.3, rank_allocation="layers")).needs
    assert EXPERT_SPECTRA not in get_compressor("submoe")(cls(num_experts=2, subspace_budget=0.5)).needs


@pytest.mark.parametrize("options", [dict(subspace_budget=0.5), dict(rank=6)])
def test_pipeline_runs_the_spectra_prepass_and_merges_at_the_allocated_ranks(options):
    model = _two_layers(0)
    table = _table(_two_layers(0))
    stage = moe_stage("submoe", num_experts=2, rank_allocation="layers", **options)
    settings = PipelineSettings(batch_size=2)
    pre = run_prepasses(LayerWalk(model, adapter_for(model), MOE_WINDOWS, settings), [stage])
    assert sorted(pre.statistics) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), MOE_WINDOWS, settings), [stage],
                                precomputed=pre.statistics).run()
    expected = allocate_layer_ranks(table, options.get("subspace_budget"), options.get("rank"), 0.25)
    for record in records:
        if "rank" in options:
            assert record.rank == set(expected[record.name].values()).pop()
        else:
            assert record.details["subspace_ranks"] == expected[record.name]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=MOE_WINDOWS, use_cache=False).logits).all()


def test_subspace_budget_uniform_truncates_every_block_alike():
    model = tiny_moe("mixtral", num_local_experts=4, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    from moe_helpers import stats_for
    stats, _ = stats_for(block, tokens=64)
    result = get_compressor("submoe")(get_compressor("submoe").Config(num_experts=2, subspace_budget=0.5)
                                      ).compress("b", block, stats)
    shapes = {k: t.shape[1:] for k, t in expert_weights(block).types().items()}
    assert result.details["subspace_ranks"] == {k: round(0.5 * min(s)) for k, s in shapes.items()}


def test_spectra_statistic_is_weights_only_and_refuses_disagreeing_processes():
    from lrcompress.errors import NumericalError

    model = _two_layers(0)
    table = _table(model)
    first, second = table["model.layers.0.mlp"], table["model.layers.1.mlp"]
    first.merge(ExpertSpectraStatistic.of_block("model.layers.0.mlp", model.model.layers[0].mlp, {}))
    with pytest.raises(NumericalError, match="disagree"):
        first.merge(second)
    with pytest.raises(TypeError, match="weights"):
        first.observe(torch.zeros(1, 64), torch.zeros(1, 64))


def test_recipe_validates_the_allocation_options():
    from pathlib import Path

    from lrcompress.errors import RecipeError
    from lrcompress.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "submoe.yaml"
    stage = load_recipe(recipe, ["stages.0.rank_allocation=layers", "stages.0.subspace_budget=0.5"]).stages[0]
    assert stage.options["rank_allocation"] == "layers" and stage.allocation.strategy == "uniform"
    with pytest.raises(RecipeError, match="shares a budget across MoE layers"):
        load_recipe(recipe, ["stages.0.rank_allocation=layers"])
    with pytest.raises(RecipeError, match="rank_floor"):
        load_recipe(recipe, ["stages.0.subspace_budget=0.5", "stages.0.rank_floor=2"])
