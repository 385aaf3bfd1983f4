"""Block stages (MoE) in the layer-wise pipeline (pipeline/blocks.py): every block merged, the block
output error record, coverage, and checkpoints that reload, on tiny MoEs of every family."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from lrcompress.checkpoint import write_checkpoint
from lrcompress.errors import LrcompressError
from lrcompress.models import adapter_for
from lrcompress.models.moe import expert_count_key, moe_blocks, route
from lrcompress.modules import LowRankExperts, storage_bytes, stored_params
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings
from helpers import tiny_model
from moe_helpers import MOE_FAMILIES, MOE_WINDOWS, block_error, moe_stage, tiny_moe


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_pipeline_merges_every_block_and_the_checkpoint_reloads(family, tmp_path):
    model = tiny_moe(family)
    original = tiny_moe(family)
    stage = moe_stage("submoe", num_experts=2)
    plan_after = {f"model.layers.{i}.mlp": stage.compressor.plan(layer.mlp).params_after
                  for i, layer in enumerate(model.model.layers) if moe_blocks(layer)}
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), MOE_WINDOWS, PipelineSettings(batch_size=2)), [stage]).run()
    assert {r.name: r.params_after for r in records} == plan_after
    # The first merged block sees the original model's inputs: its record is its output error, directly.
    first = records[0]
    index = int(first.name.split(".")[2])
    expected = block_error(original, model, index)
    assert first.relative_error == pytest.approx(expected, rel=1e-4) and expected > 0
    assert getattr(model.config, expert_count_key(model.config)) == 2
    hidden = torch.randn(30, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:
        if moe_blocks(layer):
            indices = route(layer.mlp, hidden)
            assert indices.min() >= 0 and indices.max() < 2
    with torch.no_grad():
        logits = model(input_ids=MOE_WINDOWS, use_cache=False).logits
    assert torch.isfinite(logits).all()
    write_checkpoint(model, None, tmp_path, provenance={})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=MOE_WINDOWS, use_cache=False).logits, logits)


def test_block_error_record_matches_a_direct_computation():
    model = tiny_moe("olmoe", num_hidden_layers=1)
    original = tiny_moe("olmoe", num_hidden_layers=1)
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), MOE_WINDOWS, PipelineSettings(batch_size=4)),
                                [moe_stage("expert_prune", num_experts=2)]).run()
    assert records[0].relative_error == pytest.approx(block_error(original, model, 0), rel=1e-4)


def test_a_stage_must_cover_every_moe_block():
    model = tiny_moe("mixtral")
    stage = moe_stage("submoe", ignore=["model.layers.1.*"], num_experts=2)
    with pytest.raises(LrcompressError, match="left out: model.layers.1.mlp"):
        LayerwisePipeline(LayerWalk(model, adapter_for(model), MOE_WINDOWS, PipelineSettings()), [stage]).run()
    dense = tiny_model("llama")
    with pytest.raises(LrcompressError, match="no moe blocks"):
        LayerwisePipeline(LayerWalk(dense, adapter_for(dense), MOE_WINDOWS, PipelineSettings()), [moe_stage("submoe", num_experts=2)]).run()


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_dagger_pipeline_checkpoint_reloads_with_lrcompress_load(family, tmp_path):
    import lrcompress

    model = tiny_moe(family)
    stage = moe_stage("submoe", num_experts=2, ratio=0.3)
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), MOE_WINDOWS, PipelineSettings(batch_size=2)), [stage]).run()
    assert getattr(model.config, expert_count_key(model.config)) == 2
    blocks = [layer.mlp for layer in model.model.layers if isinstance(getattr(layer.mlp, "experts", None),
                                                                       LowRankExperts)]
    assert len(blocks) == len(records) > 0
    assert all(r.bytes_after == storage_bytes(b) and r.params_after == stored_params(b)
               for r, b in zip(records, blocks))
    with torch.no_grad():
        logits = model(input_ids=MOE_WINDOWS, use_cache=False).logits
    write_checkpoint(model, None, tmp_path, provenance={})
    reloaded = lrcompress.load(tmp_path)
    assert isinstance(reloaded.model.layers[-1].mlp.experts, LowRankExperts)
    assert getattr(reloaded.config, expert_count_key(reloaded.config)) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=MOE_WINDOWS, use_cache=False).logits, logits, rtol=0, atol=1e-4)


def test_dagger_checkpoint_exports_dense_and_loads_with_from_pretrained(tmp_path):
    import lrcompress
    from lrcompress.checkpoint import export_dense

    model = tiny_moe("qwen3_moe")
    LayerwisePipeline(LayerWalk(model, adapter_for(model), MOE_WINDOWS, PipelineSettings(batch_size=2)), [moe_stage("submoe", num_experts=2, rank=6)]).run()
    (tmp_path / "c").mkdir()
    write_checkpoint(model, None, tmp_path / "c", provenance={})
    with torch.no_grad():
        logits = model(input_ids=MOE_WINDOWS, use_cache=False).logits
    export_dense(lrcompress.load(tmp_path / "c"), None, tmp_path / "d")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=MOE_WINDOWS, use_cache=False).logits, logits, rtol=0, atol=1e-4)
