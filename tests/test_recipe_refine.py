"""``runtime.refine`` in the recipe (lrcompress/recipe.py, ``RefineSpec``): it round-trips, ``true`` is the
defaults, and a bad value is refused before any work with its key and the file."""
from pathlib import Path

import pytest

from helpers import assert_runtime_option_refused
from lrcompress.errors import RecipeError
from lrcompress.recipe import RefineSpec, load_recipe, parse_recipe

BASE = {"model": {"path": "some/model"}, "stages": [{"method": "whiten", "ratio": 0.2}]}


def _with(refine, **runtime) -> dict:
    return {**BASE, "runtime": {"refine": refine, **runtime}}


def test_the_option_round_trips_through_the_recipe():
    recipe = parse_recipe(_with({"epochs": 2, "lr": 1e-3, "parameters": ["factors", "norms"], "holdout": 0.25}))
    spec = recipe.runtime.refine
    assert (spec.epochs, spec.lr, spec.parameters, spec.holdout, spec.loss, spec.revert_if_worse) == \
        (2, 1e-3, ["factors", "norms"], 0.25, "mse", True)
    again = parse_recipe(recipe.model_dump())
    assert again.runtime.refine == spec and again.fingerprint() == recipe.fingerprint()
    assert parse_recipe(_with(None)).fingerprint() != recipe.fingerprint()   # the resume fingerprint sees it


def test_true_is_the_defaults_and_false_is_off():
    assert parse_recipe(_with(True)).runtime.refine == RefineSpec()
    assert parse_recipe(_with(False)).runtime.refine is None
    assert parse_recipe(BASE).runtime.refine is None


def test_set_overrides_reach_the_option(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {path: m}\nstages:\n  - {method: whiten, ratio: 0.2}\n")
    assert load_recipe(path, ["runtime.refine.epochs=3"]).runtime.refine.epochs == 3


@pytest.mark.parametrize("refine, key", [
    ("{epochs: 0}", r"runtime\.refine\.epochs"),
    ("{lr: -1}", r"runtime\.refine\.lr"),
    ("{parameters: [weights]}", r"runtime\.refine\.parameters\.0"),
    ("{parameters: []}", r"runtime\.refine\.parameters"),
    ("{holdout: 1.0}", r"runtime\.refine\.holdout"),
    ("{loss: l1}", r"runtime\.refine\.loss"),
    ("{epoch: 2}", r"runtime\.refine\.epoch: unknown key"),
    ("{seed: 3}", r"runtime\.refine\.seed: unknown key"),      # the recipe's seed decides it
    ("8", r"runtime\.refine"),
])
def test_a_bad_value_names_the_key_and_the_file(tmp_path: Path, refine, key):
    assert_runtime_option_refused(tmp_path, "refine", refine, key)


def test_refinement_without_propagation_is_refused():
    with pytest.raises(RecipeError, match=r"runtime\.refine needs runtime\.sequential: true"):
        parse_recipe(_with({"epochs": 2}, sequential=False))
