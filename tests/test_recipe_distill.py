"""``runtime.distill`` in the recipe (lrcompress/recipe.py, ``DistillSpec``): it round-trips and reaches the resume
fingerprint, ``true`` is the defaults, a bad value is refused before any work with its key and the file, and a
lazy run (one layer resident) is refused."""
from pathlib import Path

import pytest

from helpers import assert_runtime_option_refused
from lrcompress.errors import RecipeError
from lrcompress.recipe import DistillSpec, load_recipe, parse_recipe

BASE = {"model": {"path": "some/model"}, "stages": [{"method": "whiten", "ratio": 0.2}]}


def _with(distill, **runtime) -> dict:
    return {**BASE, "runtime": {"distill": distill, **runtime}}


def test_the_option_round_trips_and_reaches_the_fingerprint():
    recipe = parse_recipe(_with({"epochs": 2, "lr": 1e-4, "batch_size": 8, "held_out": 0.25, "temperature": 2.0}))
    spec = recipe.runtime.distill
    assert (spec.epochs, spec.lr, spec.batch_size, spec.micro_batch, spec.held_out, spec.temperature,
            spec.revert_if_worse) == (2, 1e-4, 8, 1, 0.25, 2.0, True)
    again = parse_recipe(recipe.model_dump())
    assert again.runtime.distill == spec and again.fingerprint() == recipe.fingerprint()
    assert parse_recipe(_with(None)).fingerprint() != recipe.fingerprint()
    mixed = parse_recipe(_with({"divergence": "mixed", "reverse_weight": 0.3})).runtime.distill
    assert (mixed.divergence, mixed.reverse_weight) == ("mixed", 0.3)
    assert parse_recipe(_with({"divergence": "reverse"})).fingerprint() != parse_recipe(_with(True)).fingerprint()


def test_true_is_the_defaults_and_false_is_off(tmp_path):
    assert parse_recipe(_with(True)).runtime.distill == DistillSpec()
    assert parse_recipe(_with(False)).runtime.distill is None and parse_recipe(BASE).runtime.distill is None
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {path: m}\nstages:\n  - {method: whiten, ratio: 0.2}\n")
    assert load_recipe(path, ["runtime.distill.epochs=3"]).runtime.distill.epochs == 3


@pytest.mark.parametrize("distill, key", [
    ("{epochs: 0}", r"runtime\.distill\.epochs"),
    ("{lr: 0}", r"runtime\.distill\.lr"),
    ("{batch_size: 0}", r"runtime\.distill\.batch_size"),
    ("{micro_batch: 0}", r"runtime\.distill\.micro_batch"),
    ("{held_out: 0}", r"runtime\.distill\.held_out"),
    ("{warmup: 1.0}", r"runtime\.distill\.warmup"),
    ("{temperature: 0}", r"runtime\.distill\.temperature"),
    ("{epoch: 2}", r"runtime\.distill\.epoch: unknown key"),
    ("{seed: 3}", r"runtime\.distill\.seed: unknown key"),      # the recipe's seed decides it
    ("{divergence: backward}", r"runtime\.distill\.divergence"),
    ("{divergence: mixed, reverse_weight: 1.0}", r"runtime\.distill\.reverse_weight"),
    ("{reverse_weight: 0.3}", r"runtime\.distill.*reverse_weight applies only to divergence: mixed"),
    ("8", r"runtime\.distill"),
])
def test_a_bad_value_names_the_key_and_the_file(tmp_path: Path, distill, key):
    assert_runtime_option_refused(tmp_path, "distill", distill, key)


def test_a_lazy_run_is_refused():
    with pytest.raises(RecipeError, match=r"runtime\.distill .* needs it resident; runtime\.lazy: true"):
        parse_recipe(_with({"epochs": 1}, lazy=True))
