"""Per-expert statistics (compressor/expert_stats.py) against token-by-token computations: frequencies,
similarity, REAP scores, routed Grams (plain and gate-weighted)."""
import pytest
import torch

from lrcompress.compressor.expert_stats import ExpertGramStatistic, ExpertStatistic, WeightedExpertGramStatistic
from lrcompress.models.moe import expert_weights, routed_weights
from moe_helpers import tiny_moe


def _observed_in_two_parts(statistic, family, tokens, seed):
    """(block, inputs 2 × tokens × hidden, statistic): two windows observed separately with different
    chunk sizes, then merged, so that chunking and ``merge`` are both exercised."""
    model = tiny_moe(family)
    block = model.model.layers[0].mlp
    x = torch.randn(2, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    stat = statistic(block, chunk_tokens=4)
    stat.observe(x[:1], None)
    other = statistic(block, chunk_tokens=7)
    other.observe(x[1:], None)
    stat.merge(other)
    return block, x, stat


def test_expert_statistic_against_a_token_by_token_computation():
    block, x, stat = _observed_in_two_parts(ExpertStatistic, "qwen2_moe", tokens=9, seed=3)
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        chosen = block.gate(tokens)[2]
        outs = [block.experts(tokens, torch.full((len(tokens), 1), e), torch.ones(len(tokens), 1)) for e in range(4)]
    counts = torch.tensor([(chosen == e).any(dim=1).sum().item() for e in range(4)], dtype=torch.float64)
    torch.testing.assert_close(stat.frequencies(), counts / len(tokens))
    cos = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() for b in outs])
                       for a in outs]).double()
    torch.testing.assert_close(stat.similarity("b"), cos, rtol=1e-5, atol=1e-6)


def test_expert_gram_statistic_against_a_token_by_token_computation():
    block, x, stat = _observed_in_two_parts(ExpertGramStatistic, "olmoe", tokens=11, seed=4)
    tokens = x.reshape(-1, x.shape[-1])
    weights = expert_weights(block)
    with torch.no_grad():
        chosen = block.gate(tokens)[2]
    for e in range(4):
        routed = tokens[(chosen == e).any(dim=1)].double()
        hidden = torch.nn.functional.silu(routed @ weights.gate[e].double().T) * (routed @ weights.up[e].double().T)
        grams = stat.grams("b", e)
        assert int(stat.counts[e]) == len(routed)
        torch.testing.assert_close(grams["gate"], routed.T @ routed, rtol=1e-5, atol=1e-6)
        assert grams["up"] is grams["gate"]
        torch.testing.assert_close(grams["down"], hidden.T @ hidden, rtol=1e-4, atol=1e-6)


def test_routed_weights_are_the_routers_top_k_weights():
    block = tiny_moe("qwen3_moe").model.layers[0].mlp
    x = torch.randn(9, block.gate.weight.shape[1])
    with torch.no_grad():
        _, w, idx = block.gate(x)
        dense = routed_weights(block, x)
    assert torch.equal((dense > 0).sum(1), torch.full((9,), 2))
    torch.testing.assert_close(dense.gather(1, idx), w.float())


def test_weighted_grams_against_a_token_by_token_computation():
    block, x, stat = _observed_in_two_parts(WeightedExpertGramStatistic, "mixtral", tokens=11, seed=4)
    tokens = x.reshape(-1, x.shape[-1])
    weights = expert_weights(block)
    with torch.no_grad():
        gates = routed_weights(block, tokens).double()
        chosen = block.gate(tokens)[2]
    for e in range(4):
        mask = (chosen == e).any(dim=1)
        routed, g = tokens[mask].double(), gates[mask, e]
        hidden = torch.nn.functional.silu(routed @ weights.gate[e].double().T) * (routed @ weights.up[e].double().T)
        grams = stat.grams("b", e)
        assert int(stat.counts[e]) == len(routed)
        assert float(stat.mass[e]) == pytest.approx(float(g.sum()), rel=1e-6)
        torch.testing.assert_close(grams["gate"], routed.T @ (g[:, None] * routed), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grams["down"], hidden.T @ (g[:, None] * hidden), rtol=1e-4, atol=1e-6)


def test_reap_scores_against_a_token_by_token_computation():
    block, x, stat = _observed_in_two_parts(ExpertStatistic, "olmoe", tokens=9, seed=3)
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        gates = routed_weights(block, tokens).double()
        chosen = block.gate(tokens)[2]
        outs = [block.experts(tokens, torch.full((len(tokens), 1), e), torch.ones(len(tokens), 1)) for e in range(4)]
    for e in range(4):
        mask = (chosen == e).any(dim=1)
        expected = (gates[mask, e] * outs[e][mask].double().norm(dim=-1)).mean() if mask.any() else 0.0
        torch.testing.assert_close(stat.reap_scores()[e], torch.as_tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)
