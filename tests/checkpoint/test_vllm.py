"""Exported checkpoints served by vLLM (issue 30, docs/vllm.md): a tiny Llama compressed with rtn 4-bit + EoRA,
exported as a compressed-tensors base plus a PEFT LoRA adapter (``export --peft --for vllm``), and a low-rank
run exported dense, each put through ``scripts/vllm_roundtrip.py`` against ``lrcompress.load(kernels=False)``.

vLLM lives in its own venv (``scripts/vllm_env.sh``; its pins differ from the project's), so this test runs only
where ``LRCOMPRESS_VLLM_PYTHON`` names that venv's python, and is skipped otherwise.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import save_tiny
from lrcompress.cli.main import cli
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe_dict

VLLM_PYTHON = os.environ.get("LRCOMPRESS_VLLM_PYTHON")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vllm_roundtrip.py"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="LRCOMPRESS_VLLM_PYTHON is not set: the vLLM round trip "
                                "needs the venv scripts/vllm_env.sh builds (LRCOMPRESS_VLLM_PYTHON=.venv-vllm/bin/python)")


def _run(model_dir, calibration_file, out, stages):
    recipe = tiny_recipe_dict(model_dir, calibration_file, out, eval={"perplexity": []})
    recipe["stages"] = stages
    return run_recipe(parse_recipe(recipe)).output_dir


def _export(checkpoint, out, *options):
    result = CliRunner().invoke(cli, ["export", str(checkpoint), str(out), *options])
    assert result.exit_code == 0, result.output


def test_vllm_serves_the_dense_export_and_the_int4_base_with_the_eora_adapter(tmp_path, calibration_file,
                                                                             no_report):
    assert Path(VLLM_PYTHON).is_file(), f"LRCOMPRESS_VLLM_PYTHON={VLLM_PYTHON} does not exist"
    # head size 32 and multiples of 32 everywhere: what vLLM's CPU attention and int4 kernel take
    model_dir = save_tiny(tmp_path / "model", "llama", num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=128)
    eora = _run(model_dir, calibration_file, tmp_path / "eora",
                [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "eora", "rank": 8}])
    whiten = _run(model_dir, calibration_file, tmp_path / "whiten", [{"method": "whiten", "ratio": 0.2}])
    _export(eora, tmp_path / "eora-export", "--peft", "--for", "vllm")
    _export(whiten, tmp_path / "whiten-export", "--dense")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "rt"), "--new-tokens", "8", "--windows", "2",
         "--seq-len", "64", "--text", str(calibration_file), "--vllm-python", VLLM_PYTHON,
         "--case", f"name=dense,run={whiten},model={tmp_path / 'whiten-export'}",
         "--case", f"name=eora,run={eora},model={tmp_path / 'eora-export' / 'base'},"
                   f"lora={tmp_path / 'eora-export' / 'adapter'},dtype=bfloat16",
         "--case", f"name=no-adapter,run={eora},model={tmp_path / 'eora-export' / 'base'},dtype=bfloat16"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    dense, adapted, bare = json.loads((tmp_path / "rt" / "results.json").read_text())
    assert not [r["error"] for r in (dense, adapted, bare) if "error" in r]
    # float32 on both sides: the same tokens and the same NLL to float32 rounding
    assert dense["identical"] == 8 and dense["max_window_nll_diff"] < 1e-3
    # bfloat16 activations in vLLM (its CPU int4 kernel takes no float32): a token may flip only at a near-tie
    for prompt in adapted["prompts"]:
        assert prompt["identical"] or max(prompt["ours_gap"], prompt["vllm_gap"] or 0) < 0.1, prompt
    assert abs(adapted["perplexity_vllm"] / adapted["perplexity_ours"] - 1) < 0.01
    # the adapter is applied: without it vLLM's windows are several times further from the EoRA model
    assert bare["max_window_nll_diff"] > 5 * adapted["max_window_nll_diff"]


def test_vllm_serves_the_w8a8_export_of_an_8bit_run(tmp_path, calibration_file, no_report):
    """vLLM's CPU int4 kernel refuses 8 bits; ``--for vllm`` then writes w8a8 (int8 channel weights, dynamic
    per-token int8 inputs), which vLLM serves: it computes lrcompress's w8a8 simulation, in float32."""
    assert Path(VLLM_PYTHON).is_file(), f"LRCOMPRESS_VLLM_PYTHON={VLLM_PYTHON} does not exist"
    model_dir = save_tiny(tmp_path / "model", "llama", num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=128)
    run = _run(model_dir, calibration_file, tmp_path / "rtn8", [{"method": "rtn", "bits": 8, "group_size": 32}])
    _export(run, tmp_path / "w8a8", "--format", "compressed-tensors", "--for", "vllm")
    assert json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]["format"] == \
        "int-quantized"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "rt"), "--new-tokens", "8", "--windows", "2",
         "--seq-len", "64", "--text", str(calibration_file), "--vllm-python", VLLM_PYTHON,
         "--case", f"name=w8a8,run={run},model={tmp_path / 'w8a8'},int8_kernel=onednn"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = json.loads((tmp_path / "rt" / "results.json").read_text())
    assert "error" not in result, result.get("error")
    by_reference = {row["reference"]: row for row in [result, *result["variants"]]}
    simulated = by_reference["w8a8"]
    for prompt in simulated["prompts"]:
        assert prompt["identical"] or max(prompt["ours_gap"], prompt["vllm_gap"] or 0) < 0.05, prompt
    assert simulated["max_window_nll_diff"] < 1e-3   # float32 on both sides (measured: 5e-7)
    # the activations' rounding is what separates the served model from the weight-only one
    assert by_reference["w8a8-weights"]["max_window_nll_diff"] > 3 * simulated["max_window_nll_diff"]
