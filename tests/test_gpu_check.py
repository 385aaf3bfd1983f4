"""scripts/gpu_check.sh and .py, the CPU side: arguments, the steps, the one JSON (which the cost model
loads as its GPU constants) and the skip without CUDA. The GPU side runs only where a GPU is."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import load_script

from lrcompress.pipeline.costs import load_rates
from lrcompress.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


gpu_check = load_script(ROOT / "scripts" / "gpu_check.py", "gpu_check")


def test_arguments_and_steps(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path / "x.json"), "--layers", "2"])
    steps = {step.name: step for step in gpu_check.steps(args, tmp_path)}
    assert list(steps) == ["cuda_tests", "cost_rates", "quantized_kernel", "sparse_dict_kernel", "whiten", "cospadi"]
    assert "runtime.device=cuda" in steps["whiten"].command and "recipes/cospadi.yaml" in steps["cospadi"].command
    assert any("[0-1]" in word for word in steps["whiten"].command)
    assert steps["cost_rates"].command[-3:] == ["cuda", "--json", str(tmp_path / "rates.json")]
    assert all((ROOT / word).exists() for step in steps.values() for word in step.command
               if word.startswith(("tests/", "bench/", "recipes/")))
    assert sum(step.timeout for step in steps.values()) <= args.budget <= 7 * 60    # a minute left to install
    for name in ("whiten", "cospadi"):                  # the overrides are valid keys of those recipes
        command = steps[name].command
        recipe = load_recipe(ROOT / command[4], [command[i + 1] for i, w in enumerate(command) if w == "--set"])
        assert recipe.runtime.device == "cuda" and recipe.eval.lm_eval is None
        assert recipe.eval.perplexity[0].max_windows == 4 and recipe.stages[0].targets == [r"re:model\.layers\.[0-1]\..*"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--layers", "0"])


def test_the_report_is_the_cost_models_rates_file(tmp_path):
    records = {"cost_rates": {"exit": 0, "seconds": 40.0, "result": {"rates": {"cuda": {"svd": 2e-12,
                                                                                          "gemm_float32": 4e13}}}},
               "whiten": {"exit": 0, "result": {"timing": {"compress": 3.5}, "memory": {"compress": {}}}},
               "cospadi": {"exit": "timeout", "seconds": 120}}
    report = gpu_check.assemble("ok", "NVIDIA H100", records)
    assert report["compress"]["whiten"]["timing"] == {"compress": 3.5} and "cospadi" not in report["compress"]
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    rates = load_rates("cuda", str(path))
    assert rates.svd == 2e-12 and rates.gemm_float32 == 4e13 and rates.source == f"measured ({path})"


def test_without_cuda_nothing_runs_and_the_json_says_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_status", lambda: (False, "torch 2.13.0+cpu sees no CUDA device"))
    monkeypatch.setattr(gpu_check, "run_step", lambda *a: pytest.fail("a step ran without CUDA"))
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "skipped" and "no CUDA" in report["device"] and report["steps"] == {}
    assert gpu_check.main(["--only", "whiten,nonsense"]) == 2


def test_a_failed_step_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_status", lambda: (True, "fake GPU"))
    ran = []

    def fake(step, env):
        ran.append(step.name)
        assert "TRITON_INTERPRET" not in env
        return {"exit": 1 if step.name == "cuda_tests" else 0, "seconds": 1.0}

    monkeypatch.setattr(gpu_check, "run_step", fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out), "--only", "cuda_tests,quantized_kernel"]) == 0
    assert ran == ["cuda_tests", "quantized_kernel"]
    assert json.loads(out.read_text())["status"] == "failed: cuda_tests"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check")
def test_the_shell_script_skips_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPU_VENV": str(tmp_path / "no-venv")})
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "nothing is installed" in done.stdout
    assert json.loads(out.read_text())["status"] == "skipped"
    assert not (tmp_path / "no-venv").exists()
