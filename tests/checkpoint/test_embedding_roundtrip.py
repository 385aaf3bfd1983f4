"""A quantized token embedding through a whole run: written packed, stored once with a tied head, honest
bytes in metrics.json, and ``lrcompress.load`` / ``from_pretrained`` giving the in-memory model's logits."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lrcompress
from helpers import save_tiny
from lrcompress.checkpoint.layout import weight_files
from lrcompress.checkpoint.compressed_tensors import export_compressed_tensors
from lrcompress.errors import LrcompressError
from lrcompress.modules import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead
from lrcompress.pipeline.bytebudget import state_bytes
from lrcompress.recipe import parse_recipe
from lrcompress.results.inspect import inspect_checkpoint
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe_dict

IDS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(5))
EMBEDDING = {"bits": 4, "group_size": 16}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _run(source, text, out, **extra):
    recipe = tiny_recipe_dict(source, text, out, method="rtn", eval={"perplexity": []}, **extra)
    recipe["stages"] = [{"method": "rtn", "bits": 4, "group_size": 32}]
    return run_recipe(parse_recipe(recipe))


def _tensor_bytes(directory) -> int:
    total = 0
    for file in weight_files(directory):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def run(request, calibration_file, tmp_path_factory):
    source = save_tiny(tmp_path_factory.mktemp("source"), "llama", tie_word_embeddings=request.param)
    return request.param, _run(source, calibration_file, tmp_path_factory.mktemp("out") / "run",
                               embedding=EMBEDDING)


def test_loaders_give_the_in_memory_logits(run):
    tied, result = run
    memory = result.model
    assert isinstance(memory.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(memory.lm_head, TiedQuantizedHead if tied else QuantizedLinear)
    expected = _logits(memory)
    exact = lrcompress.load(result.output_dir, kernels=False)
    torch.testing.assert_close(_logits(exact), expected, rtol=0, atol=0)
    # both loaders build the packed int4 CPU kernels by default (not the reference's float order)
    native = AutoModelForCausalLM.from_pretrained(result.output_dir)
    torch.testing.assert_close(_logits(native), _logits(lrcompress.load(result.output_dir)), rtol=0, atol=1e-6)
    if tied:
        for loaded in (exact, native):
            assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
            assert loaded.lm_head.scales is loaded.model.embed_tokens.scales


def test_the_tied_codes_are_stored_once(run):
    tied, result = run
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    assert config["modules"]["model.embed_tokens"]["kind"] == "quantized_embedding"
    assert config["modules"]["lm_head"]["kind"] == ("quantized_tied_head" if tied else "quantized")
    with safe_open(weight_files(result.output_dir)[0], "pt") as handle:
        names = set().union(*(safe_open(f, "pt").keys() for f in weight_files(result.output_dir))) | set(handle.keys())
    assert "model.embed_tokens.qweight" in names and "model.embed_tokens.weight" not in names
    assert ("lm_head.qweight" in names) != tied
    if tied:
        assert config["tied"]["lm_head.qweight"] == "model.embed_tokens.qweight"


def test_bytes_are_exact_in_the_record_and_the_files(run):
    tied, result = run
    summary = result.metrics.compression
    assert summary.model_bytes_after == state_bytes(result.model) == _tensor_bytes(result.output_dir)
    records = {m.name: m for m in result.metrics.modules}
    embed = records["model.embed_tokens"]
    vocab, hidden = 259, 64
    assert embed.bytes_before == vocab * hidden * 4
    assert embed.bytes_after == vocab * hidden // 2 + vocab * (hidden // 16) * 3   # codes + fp16 scales + zeros
    assert embed.stage == -1 and embed.details["tied_lm_head"] == tied
    head = records["lm_head"]
    assert (head.bytes_after == 0) == tied and (head.params_after == 0) == tied
    assert 0 < embed.relative_error < 0.2


def test_inspect_shows_the_embedding(run):
    _, result = run
    modules = {m.name: m for m in inspect_checkpoint(result.output_dir).modules}
    embed = modules["model.embed_tokens"]
    assert embed.kind == "quantized_embedding" and embed.shape == "259×64"
    assert embed.record is not None and embed.record.bytes_after < embed.record.bytes_before


def test_compressed_tensors_export_refuses_by_name(run, tmp_path):
    _, result = run
    with pytest.raises(LrcompressError, match="model.embed_tokens is a quantized token embedding"):
        export_compressed_tensors(lrcompress.load(result.output_dir), None, tmp_path / "ct")


def test_dense_export_loads_with_plain_transformers(run, tmp_path):
    tied, result = run
    from lrcompress.checkpoint.export import export_dense

    export_dense(lrcompress.load(result.output_dir), None, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    torch.testing.assert_close(_logits(plain), _logits(result.model), rtol=0, atol=1e-5)


def test_embedding_alone_is_a_recipe(calibration_file, tmp_path):
    """No stages: the embedding is the whole compression (the decoder layers are written as they are)."""
    source = save_tiny(tmp_path / "source", "llama", tie_word_embeddings=True)
    recipe = tiny_recipe_dict(source, calibration_file, tmp_path / "run", eval={"perplexity": []},
                              embedding={"bits": 8})
    recipe["stages"] = []
    result = run_recipe(parse_recipe(recipe))
    torch.testing.assert_close(_logits(lrcompress.load(result.output_dir, kernels=False)), _logits(result.model),
                               rtol=0, atol=0)
    assert result.metrics.compression.model_bytes_after == _tensor_bytes(result.output_dir)


def test_a_byte_budget_counts_the_quantized_embedding_to_the_byte(tied_dir, calibration_file, tmp_path):
    """The budget's fixed bytes are the model's after the embedding was quantized (tied head once), and the
    written checkpoint holds exactly the total the allocation planned."""
    budget = {"bytes": 10**9, "targets": ["*.mlp.down_proj"],
              "choices": [{"method": "rtn", "bits": [2, 4], "group_size": 16}]}
    recipe = tiny_recipe_dict(tied_dir, calibration_file, tmp_path / "run", eval={"perplexity": []},
                              embedding=EMBEDDING, budget=budget)
    recipe["stages"] = []
    result = run_recipe(parse_recipe(recipe))
    allocation = result.metrics.allocation.budget
    embed = next(m for m in result.metrics.modules if m.name == "model.embed_tokens")
    dense = state_bytes(AutoModelForCausalLM.from_pretrained(tied_dir))
    targets_dense = sum(m.dense_bytes for m in allocation.modules)
    assert allocation.fixed_bytes == dense - targets_dense - embed.bytes_before + embed.bytes_after
    assert allocation.total_bytes == _tensor_bytes(result.output_dir) == result.metrics.compression.model_bytes_after


@pytest.mark.parametrize("tied", [True, False])
def test_lazy_mode_writes_the_same_checkpoint(tied, calibration_file, tmp_path):
    """runtime.lazy quantizes the materialized embedding the same way: same bytes, perplexity and logits."""
    source = save_tiny(tmp_path / "source", "llama", tie_word_embeddings=tied)
    runs = {}
    for lazy in (False, True):
        recipe = tiny_recipe_dict(source, calibration_file, tmp_path / f"run-{lazy}", embedding=EMBEDDING,
                                  runtime={"device": "cpu", "batch_size": 3, "lazy": lazy})
        recipe["stages"] = [{"method": "rtn", "bits": 4, "group_size": 32}]
        runs[lazy] = run_recipe(parse_recipe(recipe))
    resident, lazy = runs[False], runs[True]
    assert lazy.metrics.compression.model_bytes_after == resident.metrics.compression.model_bytes_after
    assert [p.value for p in lazy.metrics.eval.perplexity.values()] == \
        [p.value for p in resident.metrics.eval.perplexity.values()]
    torch.testing.assert_close(_logits(lrcompress.load(lazy.output_dir, kernels=False)),
                               _logits(lrcompress.load(resident.output_dir, kernels=False)), rtol=0, atol=0)
