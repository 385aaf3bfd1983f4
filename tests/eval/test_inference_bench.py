"""bench-infer on tiny models: both models measured, ratios consistent with the speeds, CLI renders."""
import json

import torch
from click.testing import CliRunner

from helpers import tiny_model
from lrcompress.cli.main import cli
from lrcompress.eval.inference_bench import InferenceSettings, compare_inference, ratios, tensor_bytes
from lrcompress.modules import QuantizedLinear, prepare_for_inference
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe

SMALL = InferenceSettings(prompt_tokens=16, new_tokens=4, batch=1, threads=1, repeats=2)


def test_speeds_and_ratios(tmp_path):
    dense, other = tiny_model(seed=0), tiny_model(seed=1)
    speeds = compare_inference({"dense": dense, "compressed": other}, SMALL)
    assert set(speeds) == {"dense", "compressed"}
    for speed in speeds.values():
        assert speed.prefill_tokens_per_s > 0 and speed.decode_tokens_per_s > 0
        assert len(speed.samples["prefill"]) == len(speed.samples["decode"]) == SMALL.repeats
    ratio = ratios(speeds)["compressed"]
    assert ratio["decode"] == speeds["compressed"].decode_tokens_per_s / speeds["dense"].decode_tokens_per_s
    assert ratio["tensor_bytes"] == 1.0


def test_tensor_bytes_count_the_packed_kernel_layout():
    codes = torch.randint(0, 16, (32, 64))
    module = QuantizedLinear.from_codes(codes, torch.full((32, 2), 0.01), torch.full((32, 2), 8), 4, 32, "float16",
                                        None, torch.float32)
    stored = tensor_bytes(module)
    prepare_for_inference(module)
    assert tensor_bytes(module) == stored + 32 * 64 // 2 + 2 * 32 * 2 * 2   # int4 codes + bf16 scale/zero


def test_cli_compares_a_checkpoint_with_its_source(tied_dir, calibration_file, tmp_path, no_report):
    out = run_recipe(tiny_recipe(tied_dir, calibration_file, tmp_path / "run", method="lord", ratio=0.3,
                                 eval={"perplexity": []})).output_dir
    result = CliRunner().invoke(cli, ["bench-infer", str(out), "--prompt-tokens", "16", "--new-tokens", "4",
                                      "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["dense"] == str(tied_dir) and "compressed ÷ dense" in result.output
    assert report["ratios"]["tensor_bytes"] < 1
