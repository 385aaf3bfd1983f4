"""Tiny random MoE models of every supported family, built from configs (no hub)."""
from __future__ import annotations

import torch

from helpers import tiny_model

MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)

MOE_FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32, eos_token_id=2, pad_token_id=1),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, num_hidden_layers=3, **MLA),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        n_group=1, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3, **MLA),
}


def tiny_moe(family: str, seed: int = 0, **overrides):
    """A tiny MoE; router weights get a visible scale (some families initialize them to zero)."""
    model = tiny_model(family, seed=seed, **{**MOE_FAMILIES[family], **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and getattr(gate, "weight", None) is not None and gate.weight.ndim == 2:
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
    return model


def shared_output(block, x: torch.Tensor) -> torch.Tensor:
    """The shared-expert part of a block's output (zero for families without one), computed directly."""
    if hasattr(block, "shared_expert"):
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if hasattr(block, "shared_experts"):
        return block.shared_experts(x)
    return torch.zeros_like(x)


def observed_in_two_parts(statistic, family: str, tokens: int, seed: int):
    """(block, the tokens (2·tokens × hidden), statistic): two windows observed by separate statistics with
    different chunk sizes, then merged, so that chunking and ``merge`` are both exercised."""
    model = tiny_moe(family)
    block = model.model.layers[0].mlp
    x = torch.randn(2, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    stat = statistic(block, chunk_tokens=4)
    stat.observe(x[:1], None)
    other = statistic(block, chunk_tokens=7)
    other.observe(x[1:], None)
    stat.merge(other)
    return block, x.reshape(-1, x.shape[-1]), stat
