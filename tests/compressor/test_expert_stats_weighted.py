"""Gate-weighted routed Grams and REAP scores against a token-by-token computation."""
import pytest
import torch

from lrcompress.compressor.expert_stats import ExpertStatistic, WeightedExpertGramStatistic
from lrcompress.models.moe import expert_weights, routed_weights
from moe_helpers import observed_in_two_parts as _observed, tiny_moe


def test_routed_weights_are_the_routers_top_k_weights():
    block = tiny_moe("qwen3_moe").model.layers[0].mlp
    x = torch.randn(9, block.gate.weight.shape[1])
    with torch.no_grad():
        _, w, idx = block.gate(x)
        dense = routed_weights(block, x)
    assert torch.equal((dense > 0).sum(1), torch.full((9,), 2))
    torch.testing.assert_close(dense.gather(1, idx), w.float())


def test_weighted_grams_against_a_token_by_token_computation():
    block, tokens, stat = _observed(WeightedExpertGramStatistic, "mixtral", tokens=11, seed=4)
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
    block, tokens, stat = _observed(ExpertStatistic, "olmoe", tokens=9, seed=3)
    with torch.no_grad():
        gates = routed_weights(block, tokens).double()
        chosen = block.gate(tokens)[2]
        outs = [block.experts(tokens, torch.full((len(tokens), 1), e), torch.ones(len(tokens), 1)) for e in range(4)]
    for e in range(4):
        mask = (chosen == e).any(dim=1)
        expected = (gates[mask, e] * outs[e][mask].double().norm(dim=-1)).mean() if mask.any() else 0.0
        torch.testing.assert_close(stat.reap_scores()[e], torch.as_tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)
