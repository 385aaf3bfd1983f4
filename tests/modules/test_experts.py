"""LowRankExperts and FusedExperts against transformers' fused experts modules of every MoE family."""
import pytest
import torch

from lrcompress.checkpoint.export import densify
from lrcompress.models.moe import expert_weights
from lrcompress.modules import (FusedExperts, LowRankExperts, compressed_modules, module_from_spec,
                                spec_shape, storage_bytes, stored_params)
from lrcompress.modules.experts import activation_name
from moe_helpers import MOE_FAMILIES, tiny_moe


def full_rank_experts(experts) -> LowRankExperts:
    """Exact factors (B = U·Σ, A = Vᵀ at rank min(I, hidden)) of a fused experts module."""
    weights = expert_weights(type("Block", (), {"experts": experts})())
    factors = {}
    for kind, tensor in weights.types().items():
        u, s, vh = torch.linalg.svd(tensor.double(), full_matrices=False)
        factors[kind] = (u * s[:, None, :], vh)
    return LowRankExperts.from_factors(factors, activation_name(experts.act_fn), torch.float32)


def _routing(tokens: int, experts: int, top_k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return index, weights


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_full_rank_factors_reproduce_the_fused_experts_and_the_block(family):
    model = tiny_moe(family)
    block = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    low = full_rank_experts(block.experts)
    assert low.rank == min(low.hidden_size, low.intermediate_size)
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    index, weights = _routing(40, low.num_experts, 2)
    with torch.no_grad():
        torch.testing.assert_close(low(x, index, weights), block.experts(x, index, weights), rtol=1e-4, atol=1e-5)
        before = block(x[None])
        block.experts = low                       # the family's own block forward calls the replacement
        after = block(x[None])
    before, after = (t[0] if isinstance(t, tuple) else t for t in (before, after))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_truncated_factors_compute_the_product_weights():
    g = torch.Generator().manual_seed(2)
    factors = {"gate": (torch.randn(3, 8, 2, generator=g), torch.randn(3, 2, 6, generator=g)),
               "up": (torch.randn(3, 8, 2, generator=g), torch.randn(3, 2, 6, generator=g)),
               "down": (torch.randn(3, 6, 2, generator=g), torch.randn(3, 2, 8, generator=g))}
    low = LowRankExperts.from_factors(factors, "silu", torch.float32)
    dense = {k: b @ a for k, (b, a) in factors.items()}
    fused = FusedExperts(torch.cat([dense["gate"], dense["up"]], dim=1), dense["down"], "silu")
    x = torch.randn(10, 6, generator=g)
    index, weights = _routing(10, 3, 2, seed=3)
    torch.testing.assert_close(low(x, index, weights), fused(x, index, weights), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.to_dense()(x, index, weights), fused(x, index, weights))
    padded = index.clone()
    padded[0, 0] = 3                              # the padding slot (index == E) is skipped, as in transformers
    expected = fused(x, padded, weights)
    torch.testing.assert_close(low(x, padded, weights), expected, rtol=1e-5, atol=1e-5)


def test_spec_round_trip_and_accounting():
    low = LowRankExperts(5, 16, 24, 3, "silu", dtype=torch.bfloat16)
    rebuilt = module_from_spec(low.spec(), torch.bfloat16)
    assert isinstance(rebuilt, LowRankExperts) and rebuilt.spec() == low.spec()
    assert spec_shape(low.spec()) == "5 experts × (gate/up 24×16, down 16×24)"
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in low.state_dict().items()}
    params = 5 * 3 * ((24 + 16) + (24 + 16) + (16 + 24))       # gate, up, down: r·(out + in) each
    assert stored_params(low) == params
    assert storage_bytes(low) == 2 * params                      # bfloat16, nothing but the factors


def test_compressed_modules_lists_the_experts_and_densify_restores_fused_names():
    model = tiny_moe("mixtral", num_hidden_layers=1)
    block = model.model.layers[0].mlp
    names = set(block.experts.state_dict())
    block.experts = full_rank_experts(block.experts)
    assert [name for name, _ in compressed_modules(model)] == ["model.layers.0.mlp.experts"]
    densify(model)
    assert isinstance(block.experts, FusedExperts) and set(block.experts.state_dict()) == names
    assert activation_name(block.experts.act_fn) == model.config.hidden_act
