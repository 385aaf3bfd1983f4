"""Sub-MoE on the tiny Branch-Train-MiX fixture, end to end: recipe run, plain from_pretrained (which reproduces
the recorded perplexity), the gate."""
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # bench/btx.py
from helpers import byte_tokenizer, tiny_model
from btx import BuildSettings, TrainSettings, build
from lrcompress.cli.main import cli
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe


@pytest.fixture(scope="module")
def trained_moe(tmp_path_factory):
    """A 4-expert Qwen2-MoE grown from a tiny Llama on two-alphabet text, saved with its tokenizer."""
    import random

    rng = random.Random(0)
    blocks = [" ".join("".join(rng.choice("abcdefgh" if i % 2 else "stuvwxyz") for _ in range(rng.randint(2, 6)))
                       for _ in range(60)) for i in range(60)]
    text = "\n\n".join(blocks)
    root = tmp_path_factory.mktemp("btx")
    (root / "text.txt").write_text(text)
    settings = BuildSettings(experts=4, top_k=2, moe_layers=(0, 1), seq_len=32, windows_per_domain=6,
                             router_windows=3, train=TrainSettings(steps=3, batch=2, lr=1e-2))
    moe, _ = build(tiny_model("llama", num_hidden_layers=2), byte_tokenizer(), text, settings)
    moe.save_pretrained(root / "moe")
    byte_tokenizer().save_pretrained(root / "moe")
    return root


@pytest.mark.parametrize("options", [{}, {"merge": "regmean"}, {"subspace_budget": 0.5, "rank_allocation": "layers"}],
                         ids=["paper", "regmean", "layers-allocation"])
def test_reduced_fixture_loads_with_from_pretrained_and_is_gated(trained_moe, tmp_path, options):
    out = tmp_path / "run"
    text = str(trained_moe / "text.txt")
    recipe = tiny_recipe(trained_moe / "moe", trained_moe / "text.txt", out,
                         stages=[{"method": "submoe", "num_experts": 2, "targets": ["*"], **options}],
                         eval={"perplexity": [{"dataset": text, "seq_len": 48, "max_windows": 3}],
                               "allow_calibration_split": True, "baseline": True})
    run_recipe(recipe)
    metrics = json.loads((out / "metrics.json").read_text())
    if options.get("rank_allocation") == "layers":       # the runner ran the expert_spectra pre-pass
        assert metrics["prepass"]["expert_spectra"]["blocks"] == 2
        ranks = [m["details"]["subspace_ranks"] for m in metrics["modules"]]
        assert sum(r for block in ranks for r in block.values()) == round(0.5 * 2 * 3 * 64)  # 2 blocks × 3 types × min(160, 64)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 2
    assert all(layer.mlp.experts.gate_up_proj.shape[0] == 2 for layer in model.model.layers)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 250, (1, 16))).logits).all()
    ppl = next(iter(metrics["eval"]["perplexity"].values()))["value"]
    # The checkpoint, read by plain transformers, is the model the run evaluated: its perplexity on the same
    # three windows of 48 tokens, computed here with transformers' own loss, is the recorded one.
    ids = byte_tokenizer()((trained_moe / "text.txt").read_text(), add_special_tokens=False,
                           return_tensors="pt").input_ids[0]
    windows = ids[:3 * 48].view(3, 48)
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    assert float(torch.exp(loss)) == pytest.approx(ppl, rel=1e-4)
    dense = next(iter(metrics["eval"]["baseline_perplexity"].values()))["value"]
    loose = CliRunner().invoke(cli, ["check", str(out / "metrics.json"),
                                     "--max-ppl-increase", str(max(ppl / dense - 1, 0) + 0.01)])
    assert loose.exit_code == 0, loose.output
    name = next(iter(metrics["eval"]["perplexity"]))
    tight = CliRunner().invoke(cli, ["check", str(out / "metrics.json"), "--bound", f"perplexity {name}<={ppl * 0.99}"])
    assert tight.exit_code == 1, tight.output
