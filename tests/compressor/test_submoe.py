"""submoe, expert_average and expert_prune as compressors: synthetic MoEs with known structure (prototype
experts), the configs, and Sub-MoE† (intra-expert low-rank factors). The algorithms they share are in
test_expert_merge.py, their statistics in test_expert_stats.py, the pipeline runs in pipeline/test_blocks.py."""
import pytest
import torch

from lrcompress.compressor import get_compressor
from lrcompress.compressor.expert_stats import EXPERT_GRAMS, EXPERT_STATS
from lrcompress.compressor.linalg import rank_for_ratio
from lrcompress.compressor.submoe import _reached
from lrcompress.errors import LrcompressError
from lrcompress.modules import LowRankExperts, stored_params
from moe_helpers import dagger_stats, moe_compressor, prototype_moe, stats_for, tiny_moe


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_recovers_the_prototype_groups(seed):
    groups = [0, 1, 2, 0, 1, 2]
    model, _, _ = prototype_moe(groups, seed=seed)
    block = model.model.layers[0].mlp
    stats, _ = stats_for(block, seed=seed)
    result = moe_compressor("submoe", num_experts=3, seed=seed).compress("b", block, stats)
    assert sorted(result.details["groups"]) == [[0, 3], [1, 4], [2, 5]]


def test_merging_exact_copies_reproduces_the_prototypes_and_singletons_are_unchanged():
    groups = [0, 1, 0, 2, 3]                      # experts 0 and 2 are the same; 1, 3, 4 are unique
    model, protos_gu, protos_d = prototype_moe(groups, noise=0.0)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight[2] = block.gate.weight[0]
    stats, _ = stats_for(block, tokens=128)
    result = moe_compressor("submoe", num_experts=4).compress("b", block, stats)
    assert sorted(result.details["groups"]) == [[0, 2], [1], [3], [4]]
    new = result.module
    for slot, members in enumerate(result.details["groups"]):
        proto = groups[members[0]]
        torch.testing.assert_close(new.experts.gate_up_proj[slot], protos_gu[proto], rtol=0, atol=1e-6)
        torch.testing.assert_close(new.experts.down_proj[slot], protos_d[proto], rtol=0, atol=1e-6)
        if len(members) == 1:     # exactly the original expert and router row
            assert torch.equal(new.experts.gate_up_proj[slot], block.experts.gate_up_proj[members[0]])
        torch.testing.assert_close(new.gate.weight[slot], block.gate.weight[members[0]])


def test_average_equals_submoe_at_full_rank_and_prune_keeps_the_most_used():
    model = tiny_moe("mixtral", num_local_experts=6, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    stats, x = stats_for(block, tokens=96)
    sub = moe_compressor("submoe", num_experts=3).compress("b", block, stats)
    avg = moe_compressor("expert_average", num_experts=3).compress("b", block, stats)
    assert sub.details["groups"] == avg.details["groups"]
    torch.testing.assert_close(sub.module.experts.gate_up_proj, avg.module.experts.gate_up_proj)
    truncated = moe_compressor("submoe", num_experts=3, subspace_rank=4).compress("b", block, stats)
    assert not torch.allclose(truncated.module.experts.down_proj, avg.module.experts.down_proj)
    pruned = moe_compressor("expert_prune", num_experts=3).compress("b", block, stats)
    with torch.no_grad():
        chosen = block.gate(x[0])[2]
    counts = torch.stack([(chosen == e).any(1).sum() for e in range(6)]).tolist()
    expected = sorted(sorted(range(6), key=lambda e: (-counts[e], e))[:3])
    assert pruned.details["groups"] == [[e] for e in expected]
    assert torch.equal(pruned.module.gate.weight, block.gate.weight[expected])
    assert torch.equal(pruned.module.experts.down_proj, block.experts.down_proj[expected])


def test_config_sizes():
    cls = get_compressor("submoe")
    assert cls.Config(expert_ratio=0.5).kept(8) == 4 and cls.Config(expert_ratio=0.25).kept(8) == 6
    with pytest.raises(ValueError, match="exactly one"):
        cls.Config(num_experts=2, expert_ratio=0.5)
    with pytest.raises(LrcompressError, match="no reduction"):
        cls.Config(num_experts=8).kept(8)


def test_dagger_config_and_needs():
    cls = get_compressor("submoe")
    with pytest.raises(ValueError, match="at most one of 'rank' or 'ratio'"):
        cls.Config(num_experts=2, rank=4, ratio=0.5)
    with pytest.raises(ValueError, match="give one"):
        cls.Config(num_experts=2, rank=4, subspace_rank=4)
    with pytest.raises(ValueError):
        cls.Config(num_experts=2, ratio=1.0)
    assert EXPERT_GRAMS in moe_compressor("submoe", num_experts=2, ratio=0.5).needs
    assert EXPERT_GRAMS not in moe_compressor("submoe", num_experts=2).needs
    assert cls.Config(num_experts=2, rank=1000).rank_for(32, 64) == 32
    assert cls.Config(num_experts=2, ratio=0.5).rank_for(32, 64) == rank_for_ratio(32, 64, 0.5)


def test_dagger_compress_gives_low_rank_experts_with_the_planned_size():
    model = tiny_moe("mixtral", num_local_experts=6, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    stats = dagger_stats(block, tokens=96)
    compressor = moe_compressor("submoe", num_experts=3, ratio=0.5)
    result = compressor.compress("b", block, stats)
    experts = result.module.experts
    rank = rank_for_ratio(32, 64, 0.5)
    assert isinstance(experts, LowRankExperts) and experts.num_experts == 3 and result.rank == rank == experts.rank
    assert compressor.plan(block).params_after == stored_params(result.module)
    assert compressor.plan(block).rank == rank
    assert "cholesky" in result.numerical_path
    dense = moe_compressor("expert_average", num_experts=3).compress("b", block, stats)
    assert result.details["groups"] == dense.details["groups"]
    torch.testing.assert_close(result.module.gate.weight, dense.module.gate.weight)
    # rank I = 32 is full for gate/up (I × hidden, out ≤ n·in): they equal the frequency-weighted average
    full = moe_compressor("submoe", num_experts=3, rank=32).compress("b", block, stats).module.experts.dense_weights()
    fused = dense.module.experts.gate_up_proj
    torch.testing.assert_close(torch.cat([full["gate"], full["up"]], dim=1), fused, rtol=1e-4, atol=1e-5)


def test_dagger_with_unreached_experts_gives_finite_factors(caplog):
    """Experts no token reached have empty Grams: left out of their cluster's SVD, or (a cluster nobody
    reached) whitened with the identity; the factors stay finite either way."""
    model = tiny_moe("mixtral", num_local_experts=4, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    stats = dagger_stats(block, tokens=5)       # 5 tokens: every reached expert's Gram is rank-deficient
    grams = stats[EXPERT_GRAMS]
    for e in (1, 3):
        grams.inputs[e].zero_()
        grams.intermediate[e].zero_()
        grams.counts[e] = 0
        stats[EXPERT_STATS].counts[e] = 0
    result = moe_compressor("submoe", num_experts=2, rank=8).compress("b", block, stats)
    assert all(torch.isfinite(p).all() for p in result.module.experts.parameters())
    members, w = _reached([0, 1, 3], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), grams.counts)
    assert members == [0] and w.tolist() == [1.0]
    for e in range(4):
        grams.inputs[e].zero_()
        grams.intermediate[e].zero_()
        grams.counts[e] = 0
    with caplog.at_level("WARNING"):
        empty = moe_compressor("submoe", num_experts=2, rank=8).compress("b", block, stats)
    assert "identity" in empty.numerical_path and "empty or degenerate Gram" in caplog.text
    assert all(torch.isfinite(p).all() for p in empty.module.experts.parameters())
