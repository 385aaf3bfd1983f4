"""A quantized + EoRA-compensated run end to end: checkpoint round trip of nested specs, exact bytes
in metrics.json, dense and PEFT exports that compute what the lrcompress model computes."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lrcompress
from lrcompress.checkpoint import read_metadata
from lrcompress.cli.main import cli
from lrcompress.modules import CompensatedLinear, NMSparseLinear, QuantizedLinear, dense_weight, storage_bytes
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe

IDS = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(1))
STAGES = [{"method": "gptq", "bits": 3, "group_size": 32, "act_order": True, "targets": ["*.self_attn.*"]},
          {"method": "prune", "pattern": "2:4", "targets": ["*.mlp.*"]},
          {"method": "eora", "rank": 4, "targets": ["*.q_proj", "*.v_proj", "*.mlp.*"]},
          {"method": "eora", "rank": 3, "bits": 4, "targets": ["*.o_proj"]}]


@pytest.fixture(scope="module")
def compressed(tied_dir, calibration_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    return run_recipe(tiny_recipe(tied_dir, calibration_file, out, stages=STAGES))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_nested_specs_round_trip(compressed):
    _, meta = read_metadata(compressed.output_dir)
    spec = meta["modules"]["model.layers.0.self_attn.o_proj"]
    assert spec["kind"] == "compensated" and spec["base"]["kind"] == "quantized"
    assert spec["down"]["kind"] == "quantized" and spec["up"]["bits"] == 4
    assert meta["modules"]["model.layers.1.mlp.up_proj"]["base"]["kind"] == "sparse_nm"
    assert not any(".base" in name for name in meta["modules"])  # nested modules live in their parent's spec
    assert meta["modules"]["model.layers.0.self_attn.k_proj"]["kind"] == "quantized"  # not compensated
    reloaded = lrcompress.load(compressed.output_dir, kernels=False)    # the exact reference forward
    o_proj = reloaded.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, CompensatedLinear) and isinstance(o_proj.base, QuantizedLinear)
    assert isinstance(reloaded.model.layers[1].mlp.gate_proj.base, NMSparseLinear)
    assert (_logits(reloaded) - _logits(compressed.model)).abs().max().item() == 0.0


def test_metrics_count_bytes_exactly(compressed):
    metrics = json.loads((compressed.output_dir / "metrics.json").read_text())
    c = metrics["compression"]
    model = compressed.model
    expected_after = sum(storage_bytes(model.get_submodule(m["name"])) for m in metrics["modules"]
                         if m["stage"] == max(r["stage"] for r in metrics["modules"] if r["name"] == m["name"]))
    assert c["targeted_bytes_after"] == expected_after
    # stages 0 and 1 see every targeted module first, dense float32 without bias (llama)
    assert c["targeted_bytes_before"] == sum(
        4 * m["in_features"] * m["out_features"] for m in metrics["modules"] if m["stage"] in (0, 1))
    assert 0 < c["targeted_bytes_ratio"] < 1
    for m in metrics["modules"]:
        assert m["bytes_after"] is not None and m["bytes_before"] is not None


def test_peft_export_matches_the_compressed_model(compressed, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(compressed.output_dir), str(tmp_path / "peft"), "--peft"])
    assert result.exit_code == 0, result.output
    adapter = load_file(tmp_path / "peft" / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 3 for i in (0, 1)}
    assert len(config["target_modules"]) == 2 * 6  # q, v, o, gate, up, down in 2 layers
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", dtype=torch.float32)
    # independent of peft: dense base weight + lora_B·lora_A is the compensated module's weight
    for name in config["target_modules"]:
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        expected = dense_weight(compressed.model.get_submodule(name))
        torch.testing.assert_close(base.get_submodule(name).weight + b @ a, expected, rtol=1e-5, atol=1e-6)
    peft = pytest.importorskip("peft")
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft" / "adapter")).eval()
    assert (_logits(merged) - _logits(compressed.model)).abs().max().item() <= 1e-4


def test_peft_export_needs_compensated_modules(tied_dir, calibration_file, tmp_path):
    run = run_recipe(tiny_recipe(tied_dir, calibration_file, tmp_path / "rtn",
                                 stages=[{"method": "rtn", "bits": 4}], eval={"perplexity": []}))
    result = CliRunner().invoke(cli, ["export", str(run.output_dir), str(tmp_path / "x"), "--peft"])
    assert result.exit_code == 2 and "no compensated modules" in result.output
    both = CliRunner().invoke(cli, ["export", str(run.output_dir), str(tmp_path / "x"), "--peft", "--dense"])
    assert both.exit_code == 2 and "exactly one" in both.output
