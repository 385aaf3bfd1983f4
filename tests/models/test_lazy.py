"""Lazy per-layer weights: the meta skeleton, the layer store, a lazy run against the default one, and
the layer-streamed perplexity against the whole-model one."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import save_tiny
from lrcompress.errors import LrcompressError
from lrcompress.eval.perplexity import windows_nll
from lrcompress.eval.streamed import StreamedNll
from lrcompress.models import adapter_for, load_model
from lrcompress.models.lazy import LazyLayers, load_lazy
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe_dict

WINDOWS = torch.randint(3, 259, (5, 24), generator=torch.Generator().manual_seed(0))


def checkpoint_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(a, b) -> None:
    first, second = checkpoint_tensors(a), checkpoint_tensors(b)
    assert sorted(first) == sorted(second)
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"tensors differ: {different[:5]}"


pytestmark = pytest.mark.usefixtures("no_report")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A tiny Llama saved in several shards with an index, tied embeddings."""
    return save_tiny(tmp_path_factory.mktemp("sharded"), "llama", max_shard_size="60KB", tie_word_embeddings=True)


def test_the_skeleton_holds_only_the_outer_tensors_and_layers_come_and_go(sharded_dir):
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    lazy = load_lazy(str(sharded_dir)).model
    eager = load_model(str(sharded_dir)).model
    adapter = adapter_for(lazy)
    layers = adapter.decoder_layers(lazy)
    assert all(p.is_meta for p in layers.parameters())
    assert not lazy.model.embed_tokens.weight.is_meta and lazy.lm_head.weight is lazy.model.embed_tokens.weight
    store = LazyLayers(lazy, adapter, sharded_dir)
    store.load([0, 1])
    assert torch.equal(lazy(input_ids=WINDOWS).logits, eager(input_ids=WINDOWS).logits)
    store.release([0])
    assert all(p.is_meta for p in layers[0].parameters()) and not any(p.is_meta for p in layers[1].parameters())


def test_streamed_nll_equals_the_whole_model_nll(sharded_dir):
    eager = load_model(str(sharded_dir)).model
    lazy = load_lazy(str(sharded_dir)).model
    adapter = adapter_for(lazy)
    expected = windows_nll(eager, WINDOWS, 2, torch.device("cpu"))
    got = StreamedNll(LazyLayers(lazy, adapter, sharded_dir), adapter)(lazy, WINDOWS, 2, torch.device("cpu"))
    assert len(got) == len(expected) == len(WINDOWS)
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(p.is_meta for p in adapter.decoder_layers(lazy).parameters())  # every layer released again


@pytest.mark.parametrize("sequential", [True, False])
def test_a_lazy_run_writes_the_default_runs_checkpoint(sharded_dir, calibration_file, tmp_path, sequential):
    runs = {}
    for lazy in (False, True):
        recipe = tiny_recipe_dict(sharded_dir, calibration_file, tmp_path / f"lazy-{lazy}",
                                  runtime={"device": "cpu", "batch_size": 3, "lazy": lazy, "sequential": sequential})
        runs[lazy] = run_recipe(parse_recipe(recipe)).metrics.dump()
    assert_same_tensors(tmp_path / "lazy-False", tmp_path / "lazy-True")
    configs = [json.loads((tmp_path / f"lazy-{lazy}" / "config.json").read_text()) for lazy in (False, True)]
    assert configs[0]["quantization_config"]["modules"] == configs[1]["quantization_config"]["modules"]
    assert configs[1]["quantization_config"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    (key, eager_ppl), = runs[False]["eval"]["perplexity"].items()
    assert runs[True]["eval"]["perplexity"][key]["value"] == pytest.approx(eager_ppl["value"], abs=1e-4)
    assert runs[True]["compression"] == runs[False]["compression"]
    assert [m["relative_error"] for m in runs[True]["modules"]] == [m["relative_error"] for m in runs[False]["modules"]]
    assert runs[True]["memory"]["lazy"] and runs[True]["memory"]["compress"]["peak_memory_bytes"] > 0
    reloaded = load_model(str(tmp_path / "lazy-True")).model  # the index-sharded checkpoint loads
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_lazy_mode_refuses_what_needs_the_whole_model(tiny_llama_dir, calibration_file, tmp_path):
    def lazy_recipe(**extra):
        recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "o",
                                  runtime={"device": "cpu", "lazy": True})
        recipe.update(extra)
        return parse_recipe(recipe)

    with pytest.raises(LrcompressError, match="lm-eval tasks need the whole model"):
        run_recipe(lazy_recipe(eval={"lm_eval": {"tasks": ["arc_easy"]}}))
    with pytest.raises(LrcompressError, match=r"needs \['fisher'\]"):
        run_recipe(lazy_recipe(stages=[{"method": "fwsvd", "ratio": 0.2}]))
    with pytest.raises(LrcompressError, match="output.save: true"):
        run_recipe(lazy_recipe(output={"dir": str(tmp_path / "o"), "save": False}))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(LrcompressError, match="no-weights has no \\*.safetensors"):
        run_recipe(lazy_recipe(model={"path": str(empty)}))


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    """A tiny Gemma 3 (sliding and full attention layers with their own rotary bases, logit soft-capping,
    a non-persistent embedding scale), saved in shards."""
    from families import family_model
    from helpers import byte_tokenizer

    directory = tmp_path_factory.mktemp("gemma3")
    model = family_model("gemma3_text")
    model.config.final_logit_softcapping = 5.0
    model.save_pretrained(directory, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(directory)
    return directory


def test_streamed_nll_equals_the_whole_model_nll_on_gemma3(gemma3_dir):
    eager = load_model(str(gemma3_dir)).model
    lazy = load_lazy(str(gemma3_dir)).model
    adapter = adapter_for(lazy)
    assert torch.equal(lazy.model.embed_tokens.embed_scale, eager.model.embed_tokens.embed_scale)
    expected = windows_nll(eager, WINDOWS, 2, torch.device("cpu"))
    got = StreamedNll(LazyLayers(lazy, adapter, gemma3_dir), adapter)(lazy, WINDOWS, 2, torch.device("cpu"))
    assert got[0] == pytest.approx(expected[0], rel=1e-6)


def test_a_lazy_run_equals_the_default_run_on_gemma3(gemma3_dir, calibration_file, tmp_path):
    runs = {}
    for lazy in (False, True):
        recipe = tiny_recipe_dict(gemma3_dir, calibration_file, tmp_path / f"lazy-{lazy}",
                                  runtime={"device": "cpu", "batch_size": 3, "lazy": lazy})
        recipe["calibration"].update(num_samples=4, seq_len=24)
        recipe["eval"]["perplexity"][0].update(seq_len=24, max_windows=2)
        runs[lazy] = run_recipe(parse_recipe(recipe)).metrics.dump()
    assert_same_tensors(tmp_path / "lazy-False", tmp_path / "lazy-True")
    (key, eager_ppl), = runs[False]["eval"]["perplexity"].items()
    assert runs[True]["eval"]["perplexity"][key]["value"] == pytest.approx(eager_ppl["value"], rel=1e-5)
    assert [m["relative_error"] for m in runs[True]["modules"]] == [m["relative_error"] for m in runs[False]["modules"]]
