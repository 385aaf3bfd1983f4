"""MoE block views on tiny random models of every family, against the families' own forward code."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from lrcompress.checkpoint import write_checkpoint
from lrcompress.errors import LrcompressError
from lrcompress.models.moe import (ExpertWeights, expert_count_key, expert_outputs, expert_weights, moe_blocks,
                                   rebuild_block, route, router_tensors)
from moe_helpers import MOE_FAMILIES, shared_output, tiny_moe

FAMILIES = list(MOE_FAMILIES)
TOKENS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def _hidden(model, seed=0):
    return torch.randn(20, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_found_only_in_sparse_layers(family):
    model = tiny_moe(family)
    found = [moe_blocks(layer) for layer in model.model.layers]
    dense_first = family.startswith("deepseek")
    assert found[0] == ([] if dense_first else ["mlp"])
    assert all(names == ["mlp"] for names in found[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_outputs_and_routing_reproduce_the_block(family):
    """Σ over the router's top-k of weight × expert output (+ shared experts) is the block's output;
    each expert's output is checked against the family's own experts forward with one-hot routing."""
    model = tiny_moe(family)
    block = model.model.layers[-1].mlp
    x = _hidden(model)
    with torch.no_grad():
        outs = expert_outputs(block, x)
        for e in range(outs.shape[0]):
            own = block.experts(x, torch.full((len(x), 1), e), torch.ones(len(x), 1))
            torch.testing.assert_close(outs[e], own, rtol=1e-5, atol=1e-6)
        _, weights, indices = block.gate(x)
        assert torch.equal(route(block, x), indices)
        routed = torch.stack([(weights[:, j, None] * outs[indices[:, j], torch.arange(len(x))])
                              for j in range(indices.shape[1])]).sum(0)
        expected = block(x[None])[0]
        torch.testing.assert_close(routed + shared_output(block, x), expected, rtol=1e-5, atol=1e-6)


def _keep_experts(model, keep):
    """Replace every MoE block by one holding only the experts ``keep`` (rows of the router too)."""
    for layer in model.model.layers:
        if not moe_blocks(layer):
            continue
        block = layer.mlp
        w = expert_weights(block)
        sub = ExpertWeights(w.gate[keep], w.up[keep], w.down[keep])
        layer.mlp = rebuild_block(block, sub, {k: t[keep] for k, t in router_tensors(block).items()})
    setattr(model.config, expert_count_key(model.config), len(keep))


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuilt_model_saves_and_reloads_with_plain_from_pretrained(family, tmp_path):
    model = tiny_moe(family)
    original = {n: p.clone() for n, p in model.named_parameters()}
    keep = [0, 2]
    _keep_experts(model, keep)
    for name, p in model.named_parameters():                   # the original blocks were not modified
        if "experts" not in name and "gate.weight" not in name:
            assert torch.equal(p, original[name]), name
    with torch.no_grad():
        logits = model(input_ids=TOKENS, use_cache=False).logits
    write_checkpoint(model, None, tmp_path, provenance={})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert getattr(reloaded.config, expert_count_key(reloaded.config)) == 2
    block = reloaded.model.layers[-1].mlp
    assert block.experts.gate_up_proj.shape[0] == 2 and block.gate.weight.shape[0] == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=TOKENS, use_cache=False).logits, logits)
    # and the kept experts are the original ones
    gate_up = original["model.layers.1.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(reloaded.model.layers[1].mlp.experts.gate_up_proj, gate_up[keep])


def test_rebuild_refuses_fewer_experts_than_top_k_and_broken_groups():
    model = tiny_moe("mixtral")
    block = model.model.layers[0].mlp
    w = expert_weights(block)
    one = ExpertWeights(w.gate[:1], w.up[:1], w.down[:1])
    with pytest.raises(LrcompressError, match="picks 2"):
        rebuild_block(block, one, {"weight": block.gate.weight[:1]})
    v3 = tiny_moe("deepseek_v3", n_routed_experts=8, num_experts_per_tok=1, n_group=2)
    block = v3.model.layers[1].mlp
    w = expert_weights(block)
    three = ExpertWeights(w.gate[:3], w.up[:3], w.down[:3])
    with pytest.raises(LrcompressError, match="n_group=2"):
        rebuild_block(block, three, {k: t[:3] for k, t in router_tensors(block).items()})


def test_router_tensors_include_deepseek_score_correction_bias():
    block = tiny_moe("deepseek_v3").model.layers[1].mlp
    assert set(router_tensors(block)) == {"weight", "e_score_correction_bias"}
    assert set(router_tensors(tiny_moe("mixtral").model.layers[0].mlp)) == {"weight"}


OLD_TABLE = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
             "olmoe": "num_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_expert_count_key_is_the_one_the_modeling_code_reads(family):
    model = tiny_moe(family)
    key = expert_count_key(model.config)
    assert getattr(model.config, key) == 4
    setattr(model.config, key, 3)                   # the same setting as the one the modeling code reads
    assert getattr(model.config, OLD_TABLE[family]) == 3


def test_blocks_are_found_by_structure_under_any_name():
    """GraniteMoE: the block is ``block_sparse_moe`` and its router is called ``router``."""
    from helpers import tiny_model

    model = tiny_model("granitemoe", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)
    layer = model.model.layers[0]
    assert moe_blocks(layer) == ["block_sparse_moe"]
    assert route(layer.block_sparse_moe, _hidden(model)).shape == (20, 2)
    assert expert_count_key(model.config) == "num_local_experts"


def test_an_unsupported_expert_layout_is_refused_with_the_layout_named():
    from helpers import tiny_model

    model = tiny_model("gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                       layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    with pytest.raises(LrcompressError, match="is_transposed"):
        moe_blocks(model.model.layers[0])
