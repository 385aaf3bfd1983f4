"""Lazy mode under a real memory limit: a synthetic random-weight checkpoint several times larger than
the budget is compressed in a subprocess whose data segment (RLIMIT_DATA, set after the imports) may
grow by the budget only. The default mode must fail under the same limit, so the limit is real."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import save_tiny
from tiny_runs import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 48 * 2**20
SYNTHETIC = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=8,
                 num_key_value_heads=2)        # 16 layers × 8.9 MB fp32 ≈ 143 MB on disk, ~3× the budget

LIMITED = """
import json, resource, sys
import torch
import transformers.models.llama.modeling_llama  # noqa: F401 (code is imported before the limit)
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


torch.set_num_threads(1)
start_rss = status("VmRSS")
soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
resource.setrlimit(resource.RLIMIT_DATA, (status("VmData") + int(sys.argv[2]), hard))
try:
    metrics = run_recipe(parse_recipe(json.loads(open(sys.argv[1]).read()))).metrics
except (MemoryError, RuntimeError) as error:
    print(json.dumps({"ok": False, "error": str(error)[:300]}))
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ok": True, "growth": peak - start_rss, "compress": metrics["memory"]["compress"]}))
"""


def run_limited(tmp_path: Path, model_dir: Path, calibration_file: Path, lazy: bool) -> dict:
    recipe = tiny_recipe_dict(model_dir, calibration_file, tmp_path / f"out-{lazy}", method="svd", ratio=0.5,
                              runtime={"device": "cpu", "batch_size": 2, "lazy": lazy})
    recipe["calibration"].update(num_samples=4, seq_len=32)
    recipe["eval"]["perplexity"][0].update(seq_len=32, max_windows=2)
    recipe_file = tmp_path / f"recipe-{lazy}.json"
    recipe_file.write_text(json.dumps(recipe))
    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(recipe_file), str(BUDGET)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("synthetic"), "llama", max_shard_size="40MB", **SYNTHETIC)


def test_lazy_mode_compresses_a_model_several_times_larger_than_its_memory_budget(synthetic_dir, calibration_file,
                                                                                   tmp_path):
    size = sum(p.stat().st_size for p in synthetic_dir.glob("*.safetensors"))
    assert size > 2.5 * BUDGET
    eager = run_limited(tmp_path, synthetic_dir, calibration_file, lazy=False)
    assert not eager["ok"], "the default mode fit in the budget: the limit proves nothing"
    lazy = run_limited(tmp_path, synthetic_dir, calibration_file, lazy=True)
    assert lazy["ok"], lazy
    assert lazy["growth"] < BUDGET, lazy
    assert lazy["compress"]["peak_memory_growth_bytes"] < BUDGET, lazy
    assert (tmp_path / "out-True" / "model.safetensors.index.json").is_file()
