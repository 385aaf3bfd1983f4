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


MOE_WINDOWS = torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(0))


def block_error(original, compressed, index: int, windows=MOE_WINDOWS) -> float:
    """‖block'(x) − block(x)‖ / ‖block(x)‖ of layer ``index``'s MLP block on the inputs it gets in the
    original model (all of its tokens: fewer than the records' sample capacity, 2048, in these tests)."""
    captured = []
    handle = original.model.layers[index].mlp.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        original(input_ids=windows, use_cache=False)
        handle.remove()
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])[None]
        before, after = (_block_output(model.model.layers[index].mlp(x)) for model in (original, compressed))
    return float((after - before).norm() / before.norm())


def _block_output(result):
    return result[0] if isinstance(result, tuple) else result


def moe_stage(method, targets=("*",), ignore=(), **options):
    """A stage of ``method`` (a block compressor) over the given patterns."""
    from lrcompress.compressor import get_compressor
    from lrcompress.pipeline import Stage

    cls = get_compressor(method)
    return Stage(0, cls(cls.Config(**options)), list(targets), list(ignore))


def moe_compressor(method, **options):
    from lrcompress.compressor import get_compressor

    cls = get_compressor(method)
    return cls(cls.Config(**options))


def prototype_moe(groups, noise=1e-3, seed=0):
    """A Mixtral whose experts are a few prototypes (expert e copies prototype groups[e]) plus noise."""
    experts = len(groups)
    model = tiny_moe("mixtral", seed=seed, num_local_experts=experts, num_experts_per_tok=2, num_hidden_layers=1)
    g = torch.Generator().manual_seed(seed + 7)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        protos_gu = torch.randn(max(groups) + 1, *block.experts.gate_up_proj.shape[1:], generator=g) * 0.3
        protos_d = torch.randn(max(groups) + 1, *block.experts.down_proj.shape[1:], generator=g) * 0.3
        index = torch.tensor(groups)
        block.experts.gate_up_proj.copy_(protos_gu[index] + noise * torch.randn(block.experts.gate_up_proj.shape,
                                                                                 generator=g))
        block.experts.down_proj.copy_(protos_d[index] + noise * torch.randn(block.experts.down_proj.shape, generator=g))
    return model, protos_gu, protos_d


def stats_for(block, tokens=64, seed=0):
    from lrcompress.compressor.block import INPUT_SAMPLE, InputSample
    from lrcompress.compressor.expert_stats import EXPERT_STATS, ExpertStatistic

    x = torch.randn(1, tokens, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    stats = {EXPERT_STATS: ExpertStatistic(block), INPUT_SAMPLE: InputSample()}
    with torch.no_grad():
        for s in stats.values():
            s.observe(x, None)
    return stats, x


def dagger_stats(block, tokens=64, seed=0):
    from lrcompress.compressor.expert_stats import EXPERT_GRAMS, ExpertGramStatistic

    stats, x = stats_for(block, tokens, seed)
    stats[EXPERT_GRAMS] = ExpertGramStatistic(block)
    with torch.no_grad():
        stats[EXPERT_GRAMS].observe(x, None)
    return stats
