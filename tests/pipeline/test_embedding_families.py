"""The recipe's embedding key on every supported family: the quantized model computes what the model with
the dequantized tables computes (Gemma's scaled rows included), a tied head keeps sharing the codes, an
untied head is quantized or kept as asked, and the bytes the byte budget sees are the quantized ones."""
import copy

import pytest
import torch

from families import family_model, family_windows
from lrcompress.models import adapter_for
from lrcompress.modules import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, storage_bytes
from lrcompress.pipeline.bytebudget import state_bytes
from lrcompress.pipeline.embedding import is_tied, planned_embedding, quantize_model_embedding
from lrcompress.recipe import EmbeddingSpec

FAMILIES = ["llama", "qwen2", "gemma", "gemma3_text", "phi3", "granite", "mixtral", "qwen2_moe"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _with_dequantized_tables(original, quantized, adapter):
    """The original model with the quantized model's tables written into its float embedding and head."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        reference.get_submodule(adapter.embed).weight.copy_(quantized.get_submodule(adapter.embed).dense_weight())
        head = quantized.get_submodule(adapter.lm_head)
        if not isinstance(head, TiedQuantizedHead) and isinstance(head, QuantizedLinear):
            reference.get_submodule(adapter.lm_head).weight.copy_(head.dense_weight())
    return reference


def _model(family: str, tied: bool):
    model = family_model(family)
    if tied != is_tied(model, adapter_for(model)):
        model.config.tie_word_embeddings = tied
        model = type(model)(model.config).eval()
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_the_quantized_model_computes_with_the_dequantized_tables(family, tied):
    model = _model(family, tied)
    adapter = adapter_for(model)
    assert is_tied(model, adapter) == tied
    original = copy.deepcopy(model)
    before = state_bytes(model)
    spec = EmbeddingSpec(bits=4, group_size=16)
    planned = planned_embedding(model, adapter, spec)
    records = quantize_model_embedding(model, adapter, spec)
    assert isinstance(model.get_submodule(adapter.embed), QuantizedEmbedding)
    head = model.get_submodule(adapter.lm_head)
    assert isinstance(head, TiedQuantizedHead if tied else QuantizedLinear)
    assert [r.name for r in records] == [adapter.embed, adapter.lm_head]
    assert [p.name for p in planned] == [adapter.embed] + ([] if tied else [adapter.lm_head])
    assert [r.bytes_after for r in records] == [p.bytes_after for p in planned] + ([0] if tied else [])
    assert state_bytes(model) == before - sum(r.bytes_before - r.bytes_after for r in records)
    ids = family_windows(2)
    torch.testing.assert_close(_logits(model, ids), _logits(_with_dequantized_tables(original, model, adapter), ids),
                               rtol=1e-5, atol=1e-5)
    model.tie_weights()            # transformers' own tying no longer reaches for the replaced weights


def test_gemma_keeps_its_scaled_rows():
    model = family_model("gemma")
    adapter = adapter_for(model)
    quantize_model_embedding(model, adapter, EmbeddingSpec(bits=8))
    embed = model.get_submodule(adapter.embed)
    assert embed.embed_scale == pytest.approx(model.config.hidden_size ** 0.5)


def test_an_untied_head_can_be_kept():
    model = _model("llama", tied=False)
    adapter = adapter_for(model)
    head = model.lm_head
    records = quantize_model_embedding(model, adapter, EmbeddingSpec(bits=8, untied_lm_head=False))
    assert model.lm_head is head and [r.name for r in records] == [adapter.embed]
    assert planned_embedding(model, adapter, None) == []


def test_a_tied_embedding_is_counted_once_by_the_budget():
    model = _model("llama", tied=True)
    adapter = adapter_for(model)
    quantize_model_embedding(model, adapter, EmbeddingSpec(bits=4, group_size=16))
    embed = model.get_submodule(adapter.embed)
    outside = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                  if not n.startswith(("model.embed_tokens.", "lm_head.")))
    assert state_bytes(model) == outside + storage_bytes(embed)
