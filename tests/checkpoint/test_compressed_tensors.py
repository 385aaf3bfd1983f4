"""export --format compressed-tensors: transformers (with the compressed-tensors package) loads the export
and computes what lrcompress's exact reference computes, for 4 and 8 bits and a ragged last group."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import lrcompress
from lrcompress.cli.main import cli
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe_dict

pytest.importorskip("compressed_tensors")
IDS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(5))


def _run(tied_dir, calibration_file, out, stages):
    recipe = tiny_recipe_dict(tied_dir, calibration_file, out, eval={"perplexity": []})
    recipe["stages"] = stages
    return run_recipe(parse_recipe(recipe)).output_dir


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method,bits,group_size", [("rtn", 4, 32), ("gptq", 8, 48), ("rtn", 3, 128)])
def test_export_loads_with_transformers_and_matches(tied_dir, calibration_file, tmp_path, no_report, method, bits,
                                                    group_size):
    checkpoint = _run(tied_dir, calibration_file, tmp_path / "run",
                      [{"method": method, "bits": bits, "group_size": group_size}])
    result = CliRunner().invoke(cli, ["export", str(checkpoint), str(tmp_path / "ct"), "--format", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    for scheme in config["config_groups"].values():   # groups tile the inputs (64 and 160): a gcd when ragged
        assert scheme["weights"]["num_bits"] == bits and scheme["weights"]["group_size"] in {min(group_size, 64), 16, 32}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    reference = lrcompress.load(checkpoint, kernels=False)
    torch.testing.assert_close(_logits(exported), _logits(reference), rtol=0, atol=1e-5)


def test_what_the_format_cannot_hold_is_refused(tied_dir, calibration_file, tmp_path, no_report):
    checkpoint = _run(tied_dir, calibration_file, tmp_path / "run", [{"method": "lord", "ratio": 0.3}])
    result = CliRunner().invoke(cli, ["export", str(checkpoint), str(tmp_path / "ct"), "--format", "compressed-tensors"])
    assert result.exit_code == 2 and "rtn/gptq quantized linears only" in result.output


def test_eora_exports_a_quantized_base_and_a_peft_adapter(tied_dir, calibration_file, tmp_path, no_report):
    from peft import PeftModel
    from transformers import CompressedTensorsConfig

    checkpoint = _run(tied_dir, calibration_file, tmp_path / "run",
                      [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "eora", "rank": 4}])
    result = CliRunner().invoke(cli, ["export", str(checkpoint), str(tmp_path / "out"), "--peft"])
    assert result.exit_code == 0, result.output
    base_config = json.loads((tmp_path / "out" / "base" / "config.json").read_text())
    assert base_config["quantization_config"]["quant_method"] == "compressed-tensors"
    # peft cannot wrap compressed-tensors' packed Linear before it is decompressed: load it dequantized
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base", dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(run_compressed=False))
    adapted = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    torch.testing.assert_close(_logits(adapted), _logits(lrcompress.load(checkpoint, kernels=False)),
                               rtol=0, atol=1e-3)


def test_export_for_vllm_writes_the_packed_zero_points_compressed_tensors_decompresses(tied_dir, calibration_file,
                                                                                       tmp_path, no_report):
    """``--for vllm``: zero points in the packed (⌈outputs/8⌉ × groups) shape vLLM asserts; compressed-tensors'
    own decompression of every module gives lrcompress's dequantized weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from lrcompress.modules import dense_weight

    checkpoint = _run(tied_dir, calibration_file, tmp_path / "run", [{"method": "rtn", "bits": 4, "group_size": 32}])
    result = CliRunner().invoke(cli, ["export", str(checkpoint), str(tmp_path / "ct"), "--format", "compressed-tensors",
                                      "--for", "vllm"])
    assert result.exit_code == 0, result.output
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    [group] = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"].values()
    scheme = QuantizationScheme(**group)
    reference = lrcompress.load(checkpoint, kernels=False)
    for name in group["targets"]:
        state = {key.removeprefix(name + "."): value for key, value in tensors.items() if key.startswith(name + ".")}
        out_features, in_features = state["weight_shape"].tolist()
        assert state["weight_zero_point"].shape == (-(-out_features // 8), in_features // 32)
        state["weight_scale"] = state["weight_scale"].float()     # dequantize in float32, as lrcompress does
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        torch.testing.assert_close(weight.float(), dense_weight(reference.get_submodule(name)).float(), rtol=0,
                                   atol=1e-6)
