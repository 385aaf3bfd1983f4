"""The resident-vs-lazy choice, made once from the recipe (lrcompress/residency.py)."""
import pytest

from lrcompress.errors import LrcompressError
from lrcompress.residency import LazyModel, ResidentModel, model_class
from lrcompress.runner import build_stages
from tiny_runs import tiny_recipe


def test_the_recipe_picks_the_class_and_lazy_refuses_what_it_cannot_do(tiny_llama_dir, calibration_file, tmp_path):
    resident = tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "a")
    assert model_class(resident, build_stages(resident)) is ResidentModel
    lazy = tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "b", runtime={"device": "cpu", "lazy": True})
    assert model_class(lazy, build_stages(lazy)) is LazyModel
    fisher = tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "c", method="fwsvd",
                         runtime={"device": "cpu", "lazy": True})
    with pytest.raises(LrcompressError, match="a pass over the whole model"):
        model_class(fisher, build_stages(fisher))
