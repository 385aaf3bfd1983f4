"""Native loading: ``import lrcompress`` + ``AutoModelForCausalLM.from_pretrained`` returns the compressed
model of every module kind, plain transformers refuses a checkpoint instead of loading random weights,
and the generation config and tokenizer files travel unchanged."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import lrcompress
from helpers import save_tiny
from lrcompress.checkpoint import read_metadata, write_checkpoint
from lrcompress.compressor import get_compressor
from lrcompress.models import adapter_for
from lrcompress.modules import (CompensatedLinear, LowRankExperts, LowRankLinear, MaskedSparseLinear, NMSparseLinear,
                                QuantizedLinear, SparseDictLinear, compressed_modules)
from lrcompress.pipeline import LayerWalk, LayerwisePipeline
from lrcompress.pipeline.settings import PipelineSettings, Stage
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from moe_helpers import tiny_moe
from tiny_runs import tiny_recipe_dict

IDS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(3))

KINDS = {
    "lord": ([{"method": "lord", "ratio": 0.3}], LowRankLinear),
    "rtn4": ([{"method": "rtn", "bits": 4, "group_size": 32}], QuantizedLinear),
    "gptq3-act-order": ([{"method": "gptq", "bits": 3, "group_size": 32, "act_order": True}], QuantizedLinear),
    "prune-2:4": ([{"method": "prune", "pattern": "2:4"}], NMSparseLinear),
    "prune-0.5": ([{"method": "prune", "sparsity": 0.5}], MaskedSparseLinear),
    "cospadi-shared": ([{"method": "cospadi", "ratio": 0.2, "group_size": 2, "iterations": 1}], SparseDictLinear),
    "rtn3+eora": ([{"method": "rtn", "bits": 3, "group_size": 32}, {"method": "eora", "rank": 8}],
                  CompensatedLinear),
    "whiten+gptq-factors": ([{"method": "whiten", "ratio": 0.3},
                             {"method": "gptq", "bits": 4, "group_size": 16, "apply_to": "factors"}], LowRankLinear),
    "cospadi+rtn-values": ([{"method": "cospadi", "ratio": 0.3, "iterations": 1},
                            {"method": "rtn", "bits": 4, "group_size": 16, "apply_to": "factors"}], SparseDictLinear),
}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A tied tiny Llama whose generation config has settings a re-save would normalize away."""
    directory = save_tiny(tmp_path_factory.mktemp("source"), "llama", tie_word_embeddings=True)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 13], "do_sample": True, "temperature": 0.6, "top_p": 0.9},
        indent=4))
    return directory


@pytest.fixture(scope="module")
def checkpoints(source_dir, calibration_file, tmp_path_factory):
    import lrcompress.runner

    report, lrcompress.runner.write_report = lrcompress.runner.write_report, lambda *args, **kwargs: None
    out = {}
    try:
        for name, (stages, _) in KINDS.items():
            recipe = tiny_recipe_dict(source_dir, calibration_file, tmp_path_factory.mktemp(name) / "run",
                                      eval={"perplexity": []})
            recipe["stages"] = stages
            out[name] = run_recipe(parse_recipe(recipe)).output_dir
    finally:
        lrcompress.runner.write_report = report
    return out


@pytest.mark.parametrize("name", list(KINDS))
def test_from_pretrained_returns_the_compressed_model(checkpoints, name):
    native = AutoModelForCausalLM.from_pretrained(checkpoints[name])
    reference = lrcompress.load(checkpoints[name])
    kinds = {type(module) for _, module in compressed_modules(native)}
    assert kinds == {KINDS[name][1]}
    assert next(native.parameters()).dtype == torch.float32              # the stored dtype by default
    assert native.lm_head.weight.data_ptr() == native.model.embed_tokens.weight.data_ptr()
    # both loaders build the packed kernel layouts of quantized modules (nested ones included)
    assert all(m._inference is not None for m in native.modules() if isinstance(m, QuantizedLinear))
    torch.testing.assert_close(_logits(native), _logits(reference), rtol=0, atol=1e-6)


def test_shared_dictionaries_stay_one_tensor(checkpoints):
    native = AutoModelForCausalLM.from_pretrained(checkpoints["cospadi-shared"])
    layers = native.model.layers
    assert layers[0].mlp.up_proj.dictionary is layers[1].mlp.up_proj.dictionary


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_merged_low_rank_experts_load_natively(family, tmp_path):
    model = tiny_moe(family)
    cls = get_compressor("submoe")
    stage = Stage(0, cls(cls.Config(num_experts=2, ratio=0.3)), ["*"], [])
    LayerwisePipeline(LayerWalk(model, adapter_for(model), IDS, PipelineSettings(batch_size=2)), [stage]).run()
    write_checkpoint(model, None, tmp_path, provenance={})
    native = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(native.model.layers[-1].mlp.experts, LowRankExperts)
    torch.testing.assert_close(_logits(native), _logits(model), rtol=0, atol=1e-5)


def test_plain_transformers_refuses_naming_the_method(checkpoints):
    script = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
              f"try:\n    AutoModelForCausalLM.from_pretrained({str(checkpoints['lord'])!r})\n"
              "except ValueError as error:\n    assert 'lrcompress' not in sys.modules\n"
              "    print('REFUSED', error)\n    sys.exit(0)\nsys.exit('loaded without lrcompress')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED" in done.stdout and "quant_method 'lrcompress'" in done.stdout


def test_a_hub_id_resolves_through_the_cache(checkpoints, tmp_path):
    """A hub id goes through transformers' own file resolution (``cached_file``): a hub cache holding
    the checkpoint as revision ``main`` of ``someone/tiny-lord`` is read offline."""
    repo = tmp_path / "models--someone--tiny-lord"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoints["lord"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    native = AutoModelForCausalLM.from_pretrained("someone/tiny-lord", cache_dir=tmp_path, local_files_only=True)
    assert isinstance(native.model.layers[0].mlp.up_proj, LowRankLinear)
    torch.testing.assert_close(_logits(native), _logits(lrcompress.load(checkpoints["lord"])), rtol=0, atol=1e-6)


def test_generation_config_and_tokenizer_files_are_copied_unchanged(checkpoints, source_dir):
    out = checkpoints["rtn4"]
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source_dir / name).read_bytes(), name
    native = AutoModelForCausalLM.from_pretrained(out)
    assert native.generation_config.eos_token_id == [2, 13] and native.generation_config.temperature == 0.6


def test_checkpoints_of_the_earlier_layout_still_load(checkpoints, tmp_path):
    """Before the block became a quantization_config it was a top-level "lrcompress" key, unguarded."""
    old = tmp_path / "old"
    shutil.copytree(checkpoints["rtn4"], old)
    config = json.loads((old / "config.json").read_text())
    block = config.pop("quantization_config")
    block.pop("quant_method")
    config.pop("transformers_weights")
    config["lrcompress"] = block
    (old / "config.json").write_text(json.dumps(config))
    assert read_metadata(old)[1]["modules"] == block["modules"]
    torch.testing.assert_close(_logits(lrcompress.load(old)), _logits(lrcompress.load(checkpoints["rtn4"])),
                               rtol=0, atol=0)


def test_the_loaded_model_refuses_save_pretrained(checkpoints, tmp_path):
    """save_pretrained would write a checkpoint without the guard; lrcompress's writer is the way."""
    native = AutoModelForCausalLM.from_pretrained(checkpoints["lord"])
    with pytest.raises(ValueError):
        native.save_pretrained(tmp_path / "resaved")


def test_import_lrcompress_first_then_transformers(checkpoints):
    """The registration runs when transformers' quantizer registry is first imported (after lrcompress)."""
    script = ("import lrcompress\nfrom transformers import AutoModelForCausalLM\n"
              f"model = AutoModelForCausalLM.from_pretrained({str(checkpoints['rtn4'])!r})\n"
              "print(type(model.model.layers[0].mlp.up_proj).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("QuantizedLinear")
