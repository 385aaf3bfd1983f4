"""The paper's Sub-MoE merge as the default, RegMean, REAP pruning and HC-SMoE-style clustering, as
compressors on tiny MoEs."""
import pytest
import torch

from lrcompress.compressor import get_compressor
from lrcompress.compressor.expert_merge import average_merge, merge_weights, regmean_merge
from lrcompress.compressor.expert_stats import (EXPERT_STATS, EXPERT_WEIGHTED_GRAMS, ExpertStatistic,
                                                WeightedExpertGramStatistic)
from lrcompress.models.moe import expert_weights
from moe_helpers import moe_compressor as _compressor, tiny_moe


def _block(experts=6, intermediate=96, seed=0):
    """A Mixtral block whose experts are wider than the hidden size (I = 96 > 64), like real MLPs."""
    return tiny_moe("mixtral", seed=seed, num_local_experts=experts, num_hidden_layers=1,
                    intermediate_size=intermediate).model.layers[0].mlp


def _stats(block, tokens=96, seed=0, grams=False):
    x = torch.randn(1, tokens, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    stats = {EXPERT_STATS: ExpertStatistic(block)}
    if grams:
        stats[EXPERT_WEIGHTED_GRAMS] = WeightedExpertGramStatistic(block)
    with torch.no_grad():
        for s in stats.values():
            s.observe(x, None)
    return stats


def test_default_submoe_truncates_the_shared_subspace_to_one_experts_rank():
    block = _block()
    stats = _stats(block)
    sub = _compressor("submoe", num_experts=3).compress("b", block, stats)
    avg = _compressor("expert_average", num_experts=3).compress("b", block, stats)
    assert sub.details["groups"] == avg.details["groups"]
    original, merged, averaged = expert_weights(block), expert_weights(sub.module), expert_weights(avg.module)
    frequencies = stats[EXPERT_STATS].frequencies()
    differs = False
    for slot, members in enumerate(sub.details["groups"]):
        if len(members) == 1:
            assert torch.equal(merged.gate[slot], original.gate[members[0]])
            continue
        w = merge_weights(frequencies, members)
        gate = original.gate[members].double()                        # I × hidden = 96 × 64: out > in
        u = torch.linalg.svd(gate.permute(1, 0, 2).reshape(96, -1), full_matrices=False)[0][:, :64]
        expected = u @ u.T @ average_merge(gate, w)                   # the average on the top-64 shared directions
        torch.testing.assert_close(merged.gate[slot].double(), expected, rtol=1e-4, atol=1e-5)
        differs |= not torch.allclose(merged.gate[slot], averaged.gate[slot], atol=1e-4)
        # down (64 × 96, out < in): the union has rank ≤ 64 = min(out, in), nothing truncated
        torch.testing.assert_close(merged.down[slot], averaged.down[slot], rtol=1e-4, atol=1e-5)
    assert differs


def test_submoe_options_validate():
    cls = get_compressor("submoe")
    assert cls(cls.Config(num_experts=2, merge="regmean")).needs >= {EXPERT_STATS, EXPERT_WEIGHTED_GRAMS}
    assert EXPERT_WEIGHTED_GRAMS not in cls(cls.Config(num_experts=2)).needs
    for bad in (dict(merge="regmean", subspace_rank=3), dict(merge="regmean", ratio=0.3),
                dict(subspace_energy=0.9, rank=4)):
        with pytest.raises(ValueError):
            cls.Config(num_experts=2, **bad)


def test_regmean_compressor_merges_each_cluster_by_its_members_weighted_grams():
    block = _block(experts=4, intermediate=32)
    stats = _stats(block, grams=True)
    result = _compressor("submoe", num_experts=2, merge="regmean", regmean_damping=1e-3).compress("b", block, stats)
    grams = stats[EXPERT_WEIGHTED_GRAMS]
    original, merged = expert_weights(block), expert_weights(result.module)
    for slot, members in enumerate(result.details["groups"]):
        for kind in ("gate", "up", "down"):
            if len(members) == 1:
                torch.testing.assert_close(getattr(merged, kind)[slot], getattr(original, kind)[members[0]])
                continue
            g = torch.stack([grams.grams("b", m)[kind] for m in members])
            expected, _ = regmean_merge(getattr(original, kind)[members], g, 1e-3)
            torch.testing.assert_close(getattr(merged, kind)[slot].double(), expected, rtol=1e-5, atol=1e-6)
    assert "RegMean" in result.numerical_path and result.details["regmean_damping"]


def test_regmean_beats_averaging_on_the_routed_tokens():
    """RegMean minimizes the merged expert's gate-weighted error on its members' tokens: on those tokens
    its first projection errs less than the frequency-weighted average."""
    block = _block(experts=4, intermediate=32, seed=3)
    stats = _stats(block, tokens=256, grams=True)
    reg = _compressor("submoe", num_experts=2, merge="regmean", regmean_damping=0.0).compress("b", block, stats)
    avg = _compressor("expert_average", num_experts=2).compress("b", block, stats)
    grams = stats[EXPERT_WEIGHTED_GRAMS]
    original = expert_weights(block)

    def error(merged, slot, members):
        return sum(float(torch.trace((merged.gate[slot].double() - original.gate[m].double())
                                     @ grams.grams("b", m)["gate"]
                                     @ (merged.gate[slot].double() - original.gate[m].double()).T))
                   for m in members)

    merged = [(slot, m) for slot, m in enumerate(reg.details["groups"]) if len(m) > 1]
    assert merged
    for slot, members in merged:
        assert error(expert_weights(reg.module), slot, members) < error(expert_weights(avg.module), slot, members)


def test_reap_pruning_keeps_the_highest_reap_scores():
    block = _block(experts=6, intermediate=32)
    with torch.no_grad():                       # expert 5: rarely chosen but with huge outputs
        block.experts.down_proj[5] *= 50
    stats = _stats(block)
    scores = stats[EXPERT_STATS].reap_scores()
    result = _compressor("expert_prune", num_experts=3, score="reap").compress("b", block, stats)
    expected = sorted(sorted(range(6), key=lambda e: (-float(scores[e]), e))[:3])
    assert result.details["groups"] == [[e] for e in expected] and [5] in result.details["groups"]


def test_hierarchical_clustering_recovers_prototype_groups():
    block = _block(experts=6, intermediate=32)
    groups = [0, 1, 2, 0, 1, 2]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        protos_gu = torch.randn(3, *block.experts.gate_up_proj.shape[1:], generator=g) * 0.3
        protos_d = torch.randn(3, *block.experts.down_proj.shape[1:], generator=g) * 0.3
        block.experts.gate_up_proj.copy_(protos_gu[groups] + 1e-3 * torch.randn(block.experts.gate_up_proj.shape,
                                                                                 generator=g))
        block.experts.down_proj.copy_(protos_d[groups])
    stats = _stats(block)
    result = _compressor("expert_average", num_experts=3, clustering="hierarchical").compress("b", block, stats)
    assert result.details["groups"] == [[0, 3], [1, 4], [2, 5]]


def test_regmean_averages_a_cluster_no_token_reached(caplog):
    from lrcompress.compressor.expert_merge import merge_weights
    from lrcompress.compressor.submoe import SubMoE

    block = _block(experts=4)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(64, generator=g)
    with torch.no_grad():                       # tokens along +u, experts 2 and 3 pointing at −u: never chosen
        block.gate.weight.copy_(torch.stack([u, 0.5 * u, -u, -0.5 * u]))
    x = (1 + torch.rand(1, 96, 1, generator=g)) * u + 0.01 * torch.randn(1, 96, 64, generator=g)
    stats = {EXPERT_STATS: ExpertStatistic(block), EXPERT_WEIGHTED_GRAMS: WeightedExpertGramStatistic(block)}
    with torch.no_grad():
        for statistic in stats.values():
            statistic.observe(x, None)
    assert stats[EXPERT_STATS].frequencies()[2:].sum() == 0

    class Fixed(SubMoE):
        def groups(self, statistic, similarity, kept):
            return [[0, 1], [2, 3]]

    result = Fixed(SubMoE.Config(num_experts=2, merge="regmean")).compress("b", block, stats)
    w = merge_weights(stats[EXPERT_STATS].frequencies(), [2, 3])
    for weights, merged in ((block.experts.gate_up_proj, result.module.experts.gate_up_proj),
                            (block.experts.down_proj, result.module.experts.down_proj)):
        torch.testing.assert_close(merged[1], average_merge(weights[[2, 3]], w).to(merged.dtype))
    assert "averaged instead of RegMean" in caplog.text
