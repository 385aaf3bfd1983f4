"""End-to-end checks on the real SmolLM2-135M (made by `make model`). Slow; CI runs them too.

Select them with `-m real_model`, skip them with `-m "not real_model"`.
"""
from pathlib import Path

import pytest
import torch

import lrcompress
from lrcompress.eval import EvalContext, perplexity
from lrcompress.models import load_model
from lrcompress.recipe import PerplexitySpec, parse_recipe
from lrcompress.runner import run_recipe
from helpers import smollm2_path

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = smollm2_path()
    return path


# The compressions these checks share, each run once. The orderings they check are wide (plain SVD at
# ratio 0.2 is several times worse than the data-aware methods), so 8 calibration windows and 10 eval
# windows decide them; SVD is data-free, so its result does not depend on the calibration windows at all
# (one window only feeds the output-error record). The dense protocol check keeps its 40 windows.
CALIBRATION_WINDOWS = {"svd": 1, "whiten": 8, "lord": 8}
EVAL_WINDOWS = 10


def _recipe(model: Path, data: Path, method: str, out: Path | None) -> dict:
    return {
        "model": {"path": str(model)},
        "calibration": {"dataset": "wikitext2", "split": "validation", "num_samples": CALIBRATION_WINDOWS[method],
                        "seq_len": 512},
        "stages": [{"method": method, "ratio": 0.2}],
        "runtime": {"device": "cpu", "batch_size": 4},
        "output": {"dir": str(out), "save": True} if out else {"save": False},
        "eval": {"perplexity": [{"dataset": "wikitext2", "split": "test", "seq_len": 512,
                                 "max_windows": EVAL_WINDOWS}]},
        "data_dir": str(data),
    }


@pytest.fixture(scope="module")
def runs(smollm2, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "whiten-0.2"
    return {method: run_recipe(parse_recipe(_recipe(smollm2, data_dir, method, out if method == "whiten" else None)))
            for method in CALIBRATION_WINDOWS}


def _ppl(run) -> float:
    return run.metrics.dump()["eval"]["perplexity"]["wikitext2/test"]["value"]


def test_dense_perplexity_follows_the_reference_protocol(smollm2, data_dir):
    """DESIGN §7: an independent script measured 28.69 (WikiText-2 test, seq_len 512, first 40 windows)."""
    loaded = load_model(str(smollm2))
    result = perplexity(loaded.model, loaded.tokenizer, PerplexitySpec(max_windows=40), EvalContext(data_dir))
    assert result.windows == 40 and result.tokens == 40 * 511
    assert result.value == pytest.approx(28.69, abs=0.05)


def test_data_aware_methods_beat_plain_svd(runs):
    ppl = {method: _ppl(run) for method, run in runs.items()}
    assert ppl["whiten"] < ppl["svd"], ppl
    assert ppl["lord"] < ppl["svd"], ppl
    for run in runs.values():
        assert run.metrics.dump()["compression"]["targeted_modules"] == 210
        assert run.metrics.dump()["compression"]["targeted_ratio"] >= 0.2


def test_saved_checkpoint_reloads_with_the_same_logits(runs, smollm2):
    run = runs["whiten"]
    reloaded = lrcompress.load(run.output_dir)
    window = torch.randint(0, 49152, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = run.model(input_ids=window).logits
        actual = reloaded(input_ids=window).logits
    assert (actual - expected).abs().max().item() <= 1e-4
    dense_bytes = sum(p.stat().st_size for p in smollm2.glob("*.safetensors"))
    assert run.metrics.dump()["compression"]["bytes"] < dense_bytes


def test_gguf_file_loads_through_the_conversion_cache(smollm2, tmp_path, monkeypatch):
    """A .gguf path is dequantized once into the cache, then loads like the converted demo directory."""
    gguf = smollm2.parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.fail(f"{gguf} missing: run `make model`")
    monkeypatch.setenv("LRCOMPRESS_CACHE", str(tmp_path))
    from_gguf = load_model(str(gguf))
    reference = load_model(str(smollm2))
    assert from_gguf.local_dir.parent == tmp_path / "gguf"
    ids = reference.tokenizer("The tower is 324 metres tall.", return_tensors="pt").input_ids
    assert torch.equal(from_gguf.tokenizer("The tower is 324 metres tall.", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        diff = (from_gguf.model(input_ids=ids).logits - reference.model(input_ids=ids).logits).abs().max()
    assert diff.item() == 0.0
    assert from_gguf.model.lm_head.weight.data_ptr() == from_gguf.model.model.embed_tokens.weight.data_ptr()
