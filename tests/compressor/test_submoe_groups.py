"""``expert_groups``: submoe and expert_average merge groups the user fixes instead of clustering (issue 32's
oracle comparison: the family clusters of a Branch-Train-MiX MoE), and the option's validation."""
import pytest
import torch

from lrcompress.compressor.expert_stats import EXPERT_STATS
from lrcompress.errors import LrcompressError, RecipeError
from lrcompress.models.moe import expert_weights
from lrcompress.recipe import parse_recipe
from moe_helpers import moe_compressor, prototype_moe, stats_for, tiny_moe

FAMILIES = [[0, 1], [2, 3], [4, 5]]          # not the prototype groups below: clustering would never pick them


def _prototype_block():
    model, _, _ = prototype_moe([0, 1, 2, 0, 1, 2])
    block = model.model.layers[0].mlp
    return block, stats_for(block, tokens=96)[0]


def test_the_given_groups_are_merged_as_the_frequency_weighted_average_over_exactly_them():
    block, stats = _prototype_block()
    clustered = moe_compressor("expert_average", num_experts=3).compress("b", block, stats)
    assert sorted(clustered.details["groups"]) == [[0, 3], [1, 4], [2, 5]]
    result = moe_compressor("expert_average", expert_groups=FAMILIES).compress("b", block, stats)
    assert result.details["groups"] == FAMILIES and result.details["experts_after"] == 3
    f = stats[EXPERT_STATS].frequencies().double()
    original, merged = expert_weights(block), expert_weights(result.module)
    for slot, members in enumerate(FAMILIES):
        w = f[members] / f[members].sum()
        assert result.details["merge_weights"][slot] == pytest.approx(w.tolist(), abs=1e-6)
        for kind, tensor in original.types().items():
            expected = torch.einsum("i,ioj->oj", w, tensor[members].double())
            torch.testing.assert_close(merged.types()[kind][slot].double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.module.gate.weight[slot].double(),
                                   torch.einsum("i,ij->j", w, block.gate.weight[members].double()),
                                   rtol=1e-5, atol=1e-6)


def test_submoe_uses_the_given_groups_normalized_like_clusters_and_its_regmean_too():
    block, stats = _prototype_block()
    shuffled = [[5, 4], [0, 1], [3, 2]]          # members and groups in any order: recorded sorted, by first member
    sub = moe_compressor("submoe", expert_groups=shuffled).compress("b", block, stats)
    avg = moe_compressor("expert_average", expert_groups=FAMILIES).compress("b", block, stats)
    assert sub.details["groups"] == FAMILIES
    # Mixtral's tiny experts are narrower than the hidden size (I = 32 < 64): at the default rank only down is
    # truncated, so gate/up equal the average of the same groups
    torch.testing.assert_close(sub.module.experts.gate_up_proj, avg.module.experts.gate_up_proj, rtol=1e-4, atol=1e-5)
    compressor = moe_compressor("submoe", merge="regmean", expert_groups=FAMILIES)
    from lrcompress.compressor.expert_stats import EXPERT_WEIGHTED_GRAMS, WeightedExpertGramStatistic
    x = torch.randn(1, 96, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    stats[EXPERT_WEIGHTED_GRAMS] = WeightedExpertGramStatistic(block)
    with torch.no_grad():
        stats[EXPERT_WEIGHTED_GRAMS].observe(x, None)
    assert compressor.compress("b", block, stats).details["groups"] == FAMILIES


def test_a_block_with_another_expert_count_is_an_error_naming_it():
    block = tiny_moe("mixtral", num_local_experts=4, num_hidden_layers=1).model.layers[0].mlp
    stats, _ = stats_for(block)
    compressor = moe_compressor("expert_average", expert_groups=FAMILIES)       # a partition of 6 experts
    with pytest.raises(LrcompressError, match=r"model\.layers\.0\.mlp has 4 experts.*partition of 6"):
        compressor.compress("model.layers.0.mlp", block, stats)
    with pytest.raises(LrcompressError, match=r"model\.layers\.0\.mlp has 4 experts"):
        compressor.plan_for("model.layers.0.mlp", block)
    assert moe_compressor("expert_average", expert_groups=[[0, 1], [2, 3]]).plan_for("b", block).params_after > 0


@pytest.mark.parametrize("method, options, message", [
    ("submoe", {"num_experts": 2, "expert_groups": FAMILIES}, "'num_experts' is 2 but 'expert_groups' has 3 groups"),
    ("submoe", {"expert_groups": [[0, 1], [1, 2]]}, r"names expert\(s\) \[1\] in more than one group"),
    ("expert_average", {"expert_groups": [[0, 1], [2, 2]]}, r"names expert\(s\) \[2\]"),
    ("expert_average", {"expert_groups": [[0, 1], [2, 4]]}, r"partition of the experts 0..E−1.*\[0, 1, 2, 4\], not 0..3"),
    ("submoe", {"expert_groups": [[1, 2], [3, 4]]}, "partition of the experts"),
    ("submoe", {"expert_groups": [[0, 1], []]}, "no empty group"),
    ("submoe", {"expert_groups": [[0], [1]]}, "one group per expert: that is no reduction"),
    ("submoe", {"expert_groups": FAMILIES, "expert_ratio": 0.5}, "drop 'expert_ratio'"),
    ("expert_average", {"expert_groups": FAMILIES, "clustering": "kmeans"}, "replaces the clustering"),
    ("expert_prune", {"num_experts": 3, "expert_groups": FAMILIES}, "expert_prune merges nothing"),
    ("submoe", {}, "exactly one of 'num_experts' or 'expert_ratio'"),
])
def test_bad_groups_are_recipe_errors_that_name_the_key(method, options, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"model": {"path": "m"}, "stages": [{"method": method, **options}]})


def test_groups_alone_or_with_the_matching_num_experts_are_valid():
    recipe = parse_recipe({"model": {"path": "m"}, "stages": [
        {"method": "submoe", "expert_groups": FAMILIES},
        {"method": "expert_average", "num_experts": 3, "expert_groups": FAMILIES, "seed": 1}]})
    assert recipe.stage_config(0).kept(6) == 3 and recipe.stage_config(1).fixed_groups == FAMILIES


def test_a_truncation_that_drops_what_one_member_alone_learned_is_recorded_and_logged(caplog):
    """Like experts: the default rank drops ≈ nothing of the average. Experts that differ in which neurons they
    use (Drop-Upcycling: a quarter of one member's neurons redrawn) spread the union beyond one expert's rank:
    the truncation drops a visible share of the average, recorded and logged (bench/history/issue32-submoe.md)."""
    model, _, _ = prototype_moe([0, 0, 1, 1, 2, 2], noise=1e-3)
    block = model.model.layers[0].mlp
    stats = stats_for(block, tokens=96)[0]
    compressor = moe_compressor("submoe", expert_groups=[[0, 1], [2, 3], [4, 5]])
    with caplog.at_level("WARNING", logger="lrcompress.compressor.submoe"):
        alike = compressor.compress("b", block, stats).details["share_of_average_removed"]
    assert max(v for shares in alike.values() for v in shares) < 0.01 and not caplog.records
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        down = block.experts.down_proj                             # experts × hidden × I
        neurons = torch.randperm(down.shape[2], generator=g)[:down.shape[2] // 4]
        down[1][:, neurons] = torch.randn(down.shape[1], len(neurons), generator=g) * float(down[1].std())
    with caplog.at_level("WARNING", logger="lrcompress.compressor.submoe"):
        apart = compressor.compress("b", block, stats).details["share_of_average_removed"]
    assert apart["down"][0] > 0.01 and apart["down"][1] < 0.01
    assert any("drops" in r.getMessage() and "[0, 1]" in r.getMessage() for r in caplog.records)


def test_a_smaller_shared_subspace_the_user_asked_for_is_recorded_but_not_warned_about(caplog):
    model, _, _ = prototype_moe([0, 0, 1, 1, 2, 2], noise=1e-3)
    block = model.model.layers[0].mlp
    stats = stats_for(block, tokens=96)[0]
    with caplog.at_level("WARNING", logger="lrcompress.compressor.submoe"):
        result = moe_compressor("submoe", expert_groups=[[0, 1], [2, 3], [4, 5]], subspace_rank=4).compress(
            "b", block, stats)
    assert max(result.details["share_of_average_removed"]["down"]) > 0.1 and not caplog.records
