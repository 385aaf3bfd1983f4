"""Sub-MoE on a real-weight MoE: the first two layers of SmolLM2-135M split into experts by the bench
fixture builder (bench/moe_fixture.py), then merged. Slow-ish; marked real_model."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrcompress.checkpoint import write_checkpoint
from lrcompress.compressor import get_compressor
from lrcompress.data import calibration_windows, load_text, tokenize
from lrcompress.models import adapter_for, load_model
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from helpers import smollm2_path
from moe_helpers import block_error

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def two_layer_moe(data_dir):
    from moe_fixture import build, collect_mlp_inputs

    path = smollm2_path()
    loaded = load_model(str(path))
    dense = loaded.model
    dense.model.layers = dense.model.layers[:2]
    dense.config.num_hidden_layers = 2
    text = load_text("wikitext2", "validation", data_dir)
    windows = calibration_windows(tokenize(loaded.tokenizer, text.text), 4, 256, 7)
    moe = build(dense, collect_mlp_inputs(dense, windows[:2], 2), experts=8, top_k=2, seed=0)
    return dense, moe, windows


def test_fixture_with_every_expert_active_is_the_dense_model(two_layer_moe):
    dense, moe, windows = two_layer_moe
    for layer in moe.model.layers:          # all experts, down projections scaled back: Σ experts = dense MLP
        layer.mlp.gate.top_k = 8
        layer.mlp.experts.down_proj.data *= 4.0   # weights ≈ 1/8 each and experts carry ×2 (top-2): ×8/2
    try:
        with torch.no_grad():
            expected = dense(input_ids=windows[2:], use_cache=False).logits
            got = moe(input_ids=windows[2:], use_cache=False).logits
        assert float((got - expected).norm() / expected.norm()) < 0.02
    finally:
        for layer in moe.model.layers:
            layer.mlp.gate.top_k = 2
            layer.mlp.experts.down_proj.data /= 4.0


@pytest.mark.parametrize("method", ["submoe", "expert_average", "expert_prune"])
def test_merging_the_real_weight_moe_gives_a_plain_smaller_checkpoint(two_layer_moe, method, tmp_path):
    _, moe, windows = two_layer_moe
    model = copy.deepcopy(moe)                 # the config too: merging changes its expert count
    cls = get_compressor(method)
    stage = Stage(0, cls(cls.Config(num_experts=4)), ["*"])
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), windows[:2], PipelineSettings(batch_size=2)), [stage]).run()
    assert [r.details["experts_after"] for r in records] == [4, 4]
    # layer 0's block sees the original inputs: its record is its output error on them, computed directly
    expected = block_error(moe, model, 0, windows[:2])
    assert records[0].relative_error == pytest.approx(expected, rel=1e-4) and expected > 0
    with torch.no_grad():
        logits = model(input_ids=windows[2:], use_cache=False).logits
    write_checkpoint(model, None, tmp_path, provenance={})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_local_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=windows[2:], use_cache=False).logits, logits)
