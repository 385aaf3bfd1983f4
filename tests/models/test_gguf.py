"""GGUF input for every family transformers dequantizes: a tiny model written as a GGUF file (float32,
llama.cpp's names and conventions) loads through the conversion cache to the source model's logits,
and a run from the .gguf path compresses every linear of its decoder layers."""
import pytest
import torch
from torch import nn

from families import GGUF_FAMILIES, SEQ, family_model, family_windows
from gguf_files import write_gguf
from helpers import byte_tokenizer
from lrcompress.models import adapter_for, load_model
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe

IDS = family_windows(2, seed=2)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_a_gguf_file_loads_to_the_same_model_and_compresses(family, calibration_file, tmp_path, no_report):
    source = family_model(family, gguf=True)
    path = write_gguf(source, byte_tokenizer(), tmp_path / f"{family}.gguf")
    loaded = load_model(str(path)).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, source(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    recipe = tiny_recipe(path, calibration_file, tmp_path / "run", method="lord", ratio=0.3)
    recipe.calibration.num_samples, recipe.calibration.seq_len, recipe.eval.perplexity = 2, SEQ, []
    result = run_recipe(recipe)
    linears = [m for m in adapter_for(loaded).decoder_layers(loaded).modules() if type(m) is nn.Linear]
    assert len(result.metrics.modules) == len(linears)


def test_a_gguf_file_whose_tensors_disagree_with_its_metadata_is_one_clear_error(tmp_path, monkeypatch):
    """Without the expert sizes the experts take the config class's defaults: a shape mismatch, reported as a
    conversion failure naming the file instead of transformers' traceback."""
    import gguf_files

    from lrcompress.errors import LrcompressError

    monkeypatch.setattr(gguf_files, "EXPERT_SIZES", {})
    path = write_gguf(family_model("qwen2_moe"), byte_tokenizer(), tmp_path / "sizes-missing.gguf")
    with pytest.raises(LrcompressError, match="sizes-missing.gguf: transformers could not convert"):
        load_model(str(path))
