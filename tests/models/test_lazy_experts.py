"""Lazy mode on MoE checkpoints that store every routed expert's projections as their own tensors (how
transformers ≥ 5 saves Qwen3-MoE, and how the hub's Qwen-MoE, Mixtral and DeepSeek files are written) while
the model holds them fused: ``LazyLayers`` must stack them as transformers' own loading does."""
import pytest
import torch
from safetensors import safe_open

from helpers import save_tiny
from lrcompress.errors import LrcompressError
from lrcompress.models import adapter_for, load_model
from lrcompress.models.lazy import LazyLayers, fuse_expert_tensors, load_lazy
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe_dict


def test_a_lazy_layer_of_a_per_expert_qwen3_moe_checkpoint_equals_the_loaded_model(tmp_path):
    directory = save_tiny(tmp_path, "qwen3_moe")
    with safe_open(str(directory / "model.safetensors"), "pt") as stored:
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in set(stored.keys())   # one tensor per expert
    resident = load_model(str(directory)).model
    lazy = load_lazy(str(directory)).model
    adapter = adapter_for(lazy)
    store = LazyLayers(lazy, adapter, directory)
    store.load([0, 1])
    for i in (0, 1):
        want = adapter.decoder_layers(resident)[i].state_dict()
        got = adapter.decoder_layers(lazy)[i].state_dict()
        assert sorted(got) == sorted(want)
        assert "mlp.experts.gate_up_proj" in got
        different = [name for name in want if not torch.equal(got[name], want[name])]
        assert not different, different
    store.release([0])
    assert adapter.decoder_layers(lazy)[0].mlp.experts.gate_up_proj.is_meta


def test_a_lazy_run_of_a_per_expert_qwen3_moe_checkpoint_equals_the_default_run(tmp_path, calibration_file,
                                                                                 no_report):
    directory = save_tiny(tmp_path / "model", "qwen3_moe")
    runs = {}
    for lazy in (False, True):
        recipe = tiny_recipe_dict(directory, calibration_file, tmp_path / f"lazy-{lazy}",
                                  runtime={"device": "cpu", "batch_size": 3, "lazy": lazy})
        recipe["stages"][0]["targets"] = ["*self_attn*"]
        runs[lazy] = run_recipe(parse_recipe(recipe)).metrics.dump()
    errors = [[m["relative_error"] for m in runs[lazy]["modules"]] for lazy in (False, True)]
    assert errors[0] and errors[1] == pytest.approx(errors[0], rel=1e-6)
    (key, eager), = runs[False]["eval"]["perplexity"].items()
    assert runs[True]["eval"]["perplexity"][key]["value"] == pytest.approx(eager["value"], rel=1e-5)
    reloaded = load_model(str(tmp_path / "lazy-True")).model          # the written experts load back
    want = load_model(str(tmp_path / "lazy-False")).model.model.layers[1].mlp.experts.down_proj
    assert torch.equal(reloaded.model.layers[1].mlp.experts.down_proj, want)


def test_mixtral_names_are_renamed_and_fused_and_an_incomplete_set_is_refused():
    g = torch.Generator().manual_seed(0)
    stored = {f"m.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.randn(shape, generator=g)
              for e in range(3) for w, shape in (("w1", (4, 2)), ("w3", (4, 2)), ("w2", (2, 4)))}
    stored["m.layers.0.block_sparse_moe.gate.weight"] = torch.randn(3, 2, generator=g)
    expected = {"m.layers.0.mlp.experts.gate_up_proj", "m.layers.0.mlp.experts.down_proj", "m.layers.0.mlp.gate.weight"}
    fused = fuse_expert_tensors(stored, expected)
    assert set(fused) == expected
    assert fused["m.layers.0.mlp.experts.gate_up_proj"].shape == (3, 8, 2)
    assert torch.equal(fused["m.layers.0.mlp.experts.gate_up_proj"][2, 4:],
                       stored["m.layers.0.block_sparse_moe.experts.2.w3.weight"])
    assert torch.equal(fused["m.layers.0.mlp.experts.down_proj"][1], stored["m.layers.0.block_sparse_moe.experts.1.w2.weight"])
    unfused = {"m.layers.0.mlp.experts.0.w1.weight"}           # a model that keeps experts as modules: untouched
    assert set(fuse_expert_tensors({"m.layers.0.mlp.experts.0.w1.weight": torch.ones(1)}, unfused)) == unfused
    del stored["m.layers.0.block_sparse_moe.experts.2.w2.weight"]
    with pytest.raises(LrcompressError, match="incomplete"):
        fuse_expert_tensors(stored, expected)
