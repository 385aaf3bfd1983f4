"""export --format compressed-tensors on the real SmolLM2-135M: transformers (with the compressed-tensors
package) loads the export and computes the logits lrcompress.load computes (rtn 4-bit, group 128 over
576 and 1536 inputs: a ragged last group in every 576-input linear). Cheap: rtn needs no calibration,
so one short window only feeds the output-error record."""
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import lrcompress
from lrcompress.cli.main import cli
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
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)(input_ids=ids).logits
        reference = lrcompress.load(checkpoint, kernels=False)(input_ids=ids).logits
        kernels = lrcompress.load(checkpoint)(input_ids=ids).logits
    # the same dequantized weights in float32: equal up to summation order
    torch.testing.assert_close(exported, reference, rtol=0, atol=2e-4)
    # lrcompress's packed kernels (bfloat16 activations) choose the same next token almost everywhere
    agree = (kernels.argmax(-1) == exported.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
