"""Every supported family end to end, on tiny random models: a whiten stage compresses every linear of
the decoder layers, the checkpoint reloads with ``lrcompress.load`` to the same logits, and the dense
export loads with plain ``AutoModelForCausalLM``."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import lrcompress
from lrcompress.checkpoint import export_dense
from lrcompress.models import adapter_for, load_model
from lrcompress.runner import run_recipe
from families import FAMILIES, SEQ, family_windows, save_family
from tiny_runs import tiny_recipe

IDS = family_windows(2, seed=1)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _recipe(model_dir, text, out):
    recipe = tiny_recipe(model_dir, text, out, method="whiten", ratio=0.3)
    recipe.calibration.num_samples, recipe.calibration.seq_len = 4, SEQ
    recipe.runtime.batch_size = 2
    recipe.eval.perplexity = []
    recipe.stages[0].allow_growth = True     # Qwen2-MoE's 1×hidden shared-expert gate cannot shrink
    return recipe


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_reload_and_export(family, calibration_file, tmp_path, no_report):
    model_dir = save_family(tmp_path / "model", family)
    result = run_recipe(_recipe(model_dir, calibration_file, tmp_path / "run"))
    layers = adapter_for(result.model).decoder_layers(result.model)
    left = [name for name, module in layers.named_modules() if type(module) is nn.Linear
            and not any(name.startswith(r["name"].split("layers.", 1)[1]) for r in result.metrics.dump()["modules"])]
    assert not left, f"linears left uncompressed: {left}"
    expected = _logits(result.model)
    torch.testing.assert_close(_logits(lrcompress.load(result.output_dir)), expected, rtol=1e-4, atol=1e-4)
    loaded = load_model(str(result.output_dir))
    export_dense(loaded.model, loaded.tokenizer, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-4, atol=1e-4)
