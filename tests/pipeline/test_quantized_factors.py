"""Quantized factors through the whole path: plan → layer-wise run → record → checkpoint → load, on two families."""
from __future__ import annotations

import pytest
import torch

import lrcompress
from helpers import tiny_model
from lrcompress.checkpoint import read_metadata, write_checkpoint
from lrcompress.checkpoint.compressed_tensors import quantized_targets
from lrcompress.compressor import get_compressor
from lrcompress.errors import CheckpointError, LrcompressError
from lrcompress.models import adapter_for
from lrcompress.modules import LowRankLinear, QuantizedLinear, SparseDictLinear, compressed_modules
from lrcompress.pipeline import LayerWalk, LayerwisePipeline
from lrcompress.pipeline.plan import plan_modules
from lrcompress.pipeline.settings import PipelineSettings, Stage

IDS = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(3))
FIRST = {"whiten": {"method": "whiten", "ratio": 0.3}, "lord": {"method": "lord", "ratio": 0.3},
         "cospadi": {"method": "cospadi", "ratio": 0.3, "iterations": 1}}


def _stage(index: int, method: str, **options) -> Stage:
    cls = get_compressor(method)
    return Stage(index, cls(cls.Config(**options)), ["*"], [])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS[:2], use_cache=False).logits


@pytest.fixture(scope="module", params=[("llama", "whiten", "gptq"), ("qwen2", "lord", "gptq"),
                                        ("llama", "cospadi", "rtn")], ids=lambda p: "-".join(p))
def run(request, tmp_path_factory):
    family, first, quantizer = request.param
    model = tiny_model(family)
    stages = [_stage(0, **FIRST[first]), _stage(1, quantizer, bits=4, group_size=16, apply_to="factors")]
    plan = plan_modules(model, stages)
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), IDS, PipelineSettings(batch_size=2)),
                                stages).run()
    directory = tmp_path_factory.mktemp(f"{family}-{first}")
    write_checkpoint(model, None, directory, provenance={})
    return model, plan, records, directory, first


def test_every_target_holds_packed_factors(run):
    model, _, records, _, first = run
    modules = dict(compressed_modules(model))
    assert len(modules) == 14 and {r.stage for r in records} == {0, 1}
    for module in modules.values():
        if first == "cospadi":
            assert isinstance(module, SparseDictLinear) and isinstance(module.quantized_values, QuantizedLinear)
            assert isinstance(module.quantized_dictionary, QuantizedLinear)
        else:
            assert isinstance(module, LowRankLinear)
            assert isinstance(module.down, QuantizedLinear) and isinstance(module.up, QuantizedLinear)


def test_bytes_are_exact_in_the_plan_the_record_and_the_state_dict(run):
    model, plan, records, _, _ = run
    modules = dict(compressed_modules(model))
    planned = {p.name: p for p in plan if p.stage == 1}
    for record in (r for r in records if r.stage == 1):
        module = modules[record.name]
        # every stored tensor, a (possibly shared) dictionary at this module's share of it
        stored = sum(t.numel() * t.element_size() for key, t in module.state_dict().items() if key != "dictionary")
        if isinstance(module, SparseDictLinear) and module.dictionary is not None:
            stored += module.dictionary_share * module.dictionary.element_size()
        assert record.bytes_after == planned[record.name].bytes_after == stored
        assert record.params_after == planned[record.name].params_after
        # 4-bit codes instead of float32 factors (a dictionary's indices stay as they were)
        assert record.bytes_after < record.bytes_before / (2 if isinstance(module, SparseDictLinear) else 3)


def test_load_gives_identical_outputs_and_the_nested_spec(run):
    model, _, _, directory, first = run
    loaded = lrcompress.load(directory, kernels=False)                 # the exact dequantized reference
    assert torch.equal(_logits(loaded), _logits(model))
    fast = lrcompress.load(directory)                                   # packed kernels where available
    torch.testing.assert_close(_logits(fast), _logits(model), rtol=0, atol=1e-4)
    _, meta = read_metadata(directory)
    spec = next(iter(meta["modules"].values()))
    nested = spec["values"] if first == "cospadi" else spec["factors"]["up"]
    assert nested["kind"] == "quantized" and nested["bits"] == 4


def test_compressed_tensors_refuses_quantized_factors_by_name(run):
    model = run[0]
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj .*quantized factors.*--dense"):
        quantized_targets(model)


def test_the_plan_refuses_factors_that_no_earlier_stage_made():
    model = tiny_model("llama")
    with pytest.raises(LrcompressError, match=r"model\.layers\.0\.self_attn\.q_proj: rtn with apply_to: factors"):
        plan_modules(model, [_stage(0, "rtn", apply_to="factors")])
    with pytest.raises(LrcompressError, match="already quantized"):
        plan_modules(model, [_stage(0, "svd", ratio=0.3), _stage(1, "rtn", apply_to="factors"),
                             _stage(2, "gptq", apply_to="factors")])
    with pytest.raises(LrcompressError, match="act_order"):
        plan_modules(model, [_stage(0, "cospadi", ratio=0.3), _stage(1, "gptq", apply_to="factors", act_order=True)])
