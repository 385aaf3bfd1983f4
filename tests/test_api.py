"""The Python API: lrcompress.run (path, dict, Recipe; a model and data in memory) beside lrcompress.load."""
import pytest
import torch
import yaml

import lrcompress
from lrcompress.errors import LrcompressError
from lrcompress.modules import LowRankLinear
from tiny_runs import tiny_recipe_dict


def test_the_namespace_is_the_public_api():
    import lrcompress.runner  # noqa: F401  (submodules imported along the way are not listed)

    assert dir(lrcompress) == ["__version__", "load", "run"]


def test_run_a_yaml_path_with_overrides_then_load(tiny_llama_dir, calibration_file, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out")))
    result = lrcompress.run(path, overrides=["stages.0.ratio=0.4"])
    assert result.output_dir == tmp_path / "out" and result.metrics.compression.targeted_modules == 14
    reloaded = lrcompress.load(result.output_dir)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, LowRankLinear)


def test_run_a_model_and_text_in_memory(tiny_llama_dir, calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out")
    del recipe["model"]
    recipe["output"]["save"] = False
    result = lrcompress.run(recipe, model=model, dataset=calibration_file.read_text(),
                            tokenizer=AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert result.output_dir is None and result.model is model           # compressed in place
    assert isinstance(model.model.layers[1].self_attn.q_proj, LowRankLinear)
    assert result.metrics.provenance.calibration.source == "text given in memory"


def test_run_token_windows_in_memory_and_bad_inputs(tiny_llama_dir, calibration_file, tmp_path):
    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out", output={"save": False})
    windows = torch.randint(3, 200, (4, 32))
    result = lrcompress.run(recipe, dataset=windows)
    assert "4 token windows given in memory" in result.metrics.provenance.calibration.source
    with pytest.raises(LrcompressError, match="2-D LongTensor"):
        lrcompress.run(recipe, dataset=windows.float())


def test_data_in_memory_replaces_a_whole_mixture(tiny_llama_dir, calibration_file, tmp_path):
    """A mixture recipe with ``dataset=``: the text given is the whole calibration set, cut into the sum of
    the sources' windows; the sources are neither read nor recorded (the second one does not exist)."""
    mixture = {"seq_len": 32, "sources": [{"dataset": str(calibration_file), "num_samples": 3},
                                          {"dataset": str(tmp_path / "absent.txt"), "num_samples": 2}]}
    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out", output={"save": False},
                              calibration=mixture)
    result = lrcompress.run(recipe, dataset=calibration_file.read_text())
    calibration = result.metrics.provenance.calibration
    assert calibration.source == "text given in memory" and calibration.num_samples == 5
    assert calibration.sources is None
