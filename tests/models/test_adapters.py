"""Structural adapters: every family's parts found without a list of model types; what is not
recognised fails naming what was looked for; an explicit registration covers the exceptions."""
import pytest
from torch import nn

from lrcompress.errors import LrcompressError
from lrcompress.models import ADAPTERS, ArchitectureAdapter, adapter_for, register_adapter
from families import FAMILIES, family_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_recognised_from_its_structure(family):
    model = family_model(family)
    assert family not in ADAPTERS
    adapter = adapter_for(model)
    assert adapter == ArchitectureAdapter(family)      # the paths transformers uses for all of them
    assert len(adapter.decoder_layers(model)) == model.config.num_hidden_layers
    assert [type(m).__name__ for m in adapter.outer_modules(model)][0].endswith("Embedding")


def test_an_unrecognised_model_names_what_was_looked_for():
    model = family_model("llama")
    model.model.layers = nn.Sequential(*model.model.layers)     # no ModuleList of decoder layers any more
    with pytest.raises(LrcompressError) as error:
        adapter_for(model)
    message = str(error.value)
    assert "'llama' (LlamaForCausalLM) is not recognised: no decoder layers" in message
    assert "nn.ModuleList of config.num_hidden_layers=2" in message and "register_adapter(" in message


def test_a_registered_adapter_is_used_and_checked():
    model = family_model("llama")
    model.model.blocks = model.model.layers
    del model.model.layers
    model.config.num_hidden_layers = 3                        # structure alone would not find them now
    try:
        with pytest.raises(LrcompressError, match="not recognised"):
            adapter_for(model)
        adapter = register_adapter("llama", layers="model.blocks", embed="model.embed_tokens",
                                   final_norm="model.norm", lm_head="lm_head", rotary="model.rotary_emb")
        assert adapter_for(model) is adapter and adapter.decoder_layers(model) is model.model.blocks
        register_adapter("llama", layers="model.decoder", embed="model.embed_tokens", final_norm="model.norm",
                         lm_head="lm_head")
        with pytest.raises(LrcompressError, match="paths do not match"):
            adapter_for(model)
    finally:
        ADAPTERS.pop("llama", None)
