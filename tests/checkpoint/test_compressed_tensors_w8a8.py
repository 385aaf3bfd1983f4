"""export --format compressed-tensors --scheme w8a8 (what ``--for vllm`` picks for widths other than 4 bits):
int8 weights re-quantized per output channel, symmetric, and dynamic per-token int8 inputs. compressed-tensors'
own compressor reads and writes exactly these tensors, and transformers computes lrcompress's w8a8 simulation
(``simulate_w8a8``) with them; vLLM serving it: tests/checkpoint/test_vllm.py."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lrcompress
from lrcompress.checkpoint.compressed_tensors import simulate_w8a8
from lrcompress.cli.main import cli
from lrcompress.modules import dense_weight
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe_dict

pytest.importorskip("compressed_tensors")
IDS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(5))
# (stage, export options): auto under --for vllm for an 8-bit run with a ragged group; explicit w8a8 for a
# 3-bit act-order gptq run (its permuted columns, which wna16 refuses, are re-quantized in input order)
CASES = [({"method": "rtn", "bits": 8, "group_size": 48}, ["--for", "vllm"]),
         ({"method": "gptq", "bits": 3, "group_size": 32, "act_order": True}, ["--scheme", "w8a8"])]


def _export(tied_dir, calibration_file, tmp_path, stage, options):
    recipe = tiny_recipe_dict(tied_dir, calibration_file, tmp_path / "run", eval={"perplexity": []})
    recipe["stages"] = [stage]
    checkpoint = run_recipe(parse_recipe(recipe)).output_dir
    result = CliRunner().invoke(cli, ["export", str(checkpoint), str(tmp_path / "ct"), "--format",
                                      "compressed-tensors", *options])
    assert result.exit_code == 0, result.output
    assert "(w8a8)" in result.output
    return checkpoint


@pytest.mark.parametrize("stage,options", CASES)
def test_w8a8_tensors_are_what_compressed_tensors_writes_and_reads(tied_dir, calibration_file, tmp_path, no_report,
                                                                   stage, options):
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    checkpoint = _export(tied_dir, calibration_file, tmp_path, stage, options)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    [group] = config["config_groups"].values()
    assert group["weights"] | {"group_size": None} == group["weights"] | {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False, "group_size": None}
    inputs = group["input_activations"]
    assert (inputs["num_bits"], inputs["type"], inputs["symmetric"], inputs["strategy"], inputs["dynamic"]) == \
        (8, "int", True, "token", True)
    scheme = QuantizationScheme(**group)
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    reference = lrcompress.load(checkpoint, kernels=False)
    simulated = simulate_w8a8(lrcompress.load(checkpoint, kernels=False))
    assert len(group["targets"]) == 14
    for name in group["targets"]:
        state = {key.removeprefix(name + "."): value for key, value in tensors.items() if key.startswith(name + ".")}
        assert set(state) == {"weight", "weight_scale"}
        codes, scale = state["weight"], state["weight_scale"]
        original = dense_weight(reference.get_submodule(name)).float()
        assert codes.dtype == torch.int8 and codes.shape == original.shape and codes.abs().max() <= 127
        assert scale.dtype == torch.float32 and scale.shape == (original.shape[0], 1)
        # symmetric absmax scale per output channel; a second rounding of at most half a step per weight
        torch.testing.assert_close(scale, original.abs().amax(1, keepdim=True) / 127, rtol=1e-6, atol=0)
        assert ((codes * scale - original).abs() <= scale / 2 * (1 + 1e-5)).all()
        weight = IntQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight.float(), simulated.get_submodule(name).weight)
        recompressed = IntQuantizationCompressor.compress({"weight": weight.float(), "weight_scale": scale}, scheme)
        assert torch.equal(recompressed["weight"], codes)


def test_transformers_computes_the_w8a8_simulation(tied_dir, calibration_file, tmp_path, no_report):
    """transformers + compressed-tensors, compressed: int8 weights and per-token fake-quantized inputs (scale
    max|x| / 127.5 in compressed-tensors, 127 in vLLM); dequantized: the weights alone."""
    from transformers import CompressedTensorsConfig

    checkpoint = _export(tied_dir, calibration_file, tmp_path, *CASES[0])
    with torch.no_grad():
        served = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)(input_ids=IDS).logits
        weights_only = AutoModelForCausalLM.from_pretrained(
            tmp_path / "ct", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )(input_ids=IDS).logits
        ours = {levels: simulate_w8a8(lrcompress.load(checkpoint, kernels=False), levels)(input_ids=IDS).logits
                for levels in (127.5, 127.0, None)}
    torch.testing.assert_close(served, ours[127.5], rtol=0, atol=1e-5)
    torch.testing.assert_close(weights_only, ours[None], rtol=0, atol=1e-5)
    # the activations' rounding is visible at this scale: the comparison above can tell the three apart
    assert (ours[127.0] - ours[127.5]).abs().max() > 1e-4 and (ours[127.5] - ours[None]).abs().max() > 1e-4


def test_scheme_is_refused_outside_the_compressed_tensors_export(tied_dir, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tied_dir), str(tmp_path / "out"), "--dense", "--scheme", "w8a8"])
    assert result.exit_code == 2 and "--scheme applies to --format compressed-tensors" in result.output
