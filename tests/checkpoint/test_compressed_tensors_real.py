"""export --format compressed-tensors on the real SmolLM2-135M: transformers (with the compressed-tensors
package) loads the export and computes the logits lrcompress.load computes (rtn 4-bit, group 128 over
576 and 1536 inputs: a ragged last group in every 576-input linear). Cheap: rtn needs no calibration,
so one short window only feeds the output-error record."""
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import lrcompress
from lrcompress.cli.main import cli
from lrcompress.data import load_text
from lrcompress.data.windows import tokenize
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from helpers import smollm2_path

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.real_model


def test_smollm2_rtn4_export_matches_lrcompress_load(data_dir, tmp_path, no_report):
    recipe = {"model": {"path": str(smollm2_path())},
              "calibration": {"dataset": "wikitext2", "split": "validation", "num_samples": 1, "seq_len": 64},
              "stages": [{"method": "rtn", "bits": 4, "group_size": 128}],
              "runtime": {"device": "cpu", "batch_size": 1},
              "output": {"dir": str(tmp_path / "run"), "save": True},
              "eval": {"perplexity": []}, "data_dir": str(data_dir)}
    checkpoint = run_recipe(parse_recipe(recipe)).output_dir
    result = CliRunner().invoke(cli, ["export", str(checkpoint), str(tmp_path / "ct"), "--format", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    reference_model = lrcompress.load(checkpoint, kernels=False)
    text = load_text("wikitext2", "test", data_dir).text
    ids = tokenize(AutoTokenizer.from_pretrained(checkpoint), text[:4000])[:64].view(1, -1)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)(input_ids=ids).logits
        reference = reference_model(input_ids=ids).logits
        kernels = lrcompress.load(checkpoint)(input_ids=ids).logits
    # the same dequantized weights in float32: equal up to summation order (logits are ~10-30;
    # a wrong or random weight anywhere moves them by whole units)
    torch.testing.assert_close(exported, reference, rtol=1e-4, atol=1e-3)
    # lrcompress's packed kernels (bfloat16 activations) choose the same next token almost everywhere
    # on real text (i18 measured all 64 unchanged)
    agree = (kernels.argmax(-1) == exported.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
