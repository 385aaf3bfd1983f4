from pathlib import Path

import pytest

from lrcompress.errors import RecipeError
from lrcompress.recipe import apply_overrides, load_recipe, parse_recipe

BASE = {"model": {"path": "some/model"}, "stages": [{"method": "lord", "ratio": 0.2}]}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_valid_recipe_and_defaults():
    recipe = parse_recipe(BASE)
    assert recipe.stages[0].targets == ["*"]
    assert recipe.stage_config(0).ratio == 0.2
    assert recipe.runtime.sequential is True


def test_typo_in_stage_option_names_the_file_and_key(tmp_path):
    path = _write(tmp_path, "model: {path: m}\nstages:\n  - {method: lord, ratoi: 0.2}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "stages.0.ratoi" in str(info.value)


def test_typo_in_section_key_names_it(tmp_path):
    path = _write(tmp_path, "model: {path: m}\nruntime: {batch_sise: 4}\n")
    with pytest.raises(RecipeError, match=r"runtime\.batch_sise: unknown key"):
        load_recipe(path)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(RecipeError, match=r"stages\.0\.method.*did you mean 'lord'"):
        parse_recipe({"model": {"path": "m"}, "stages": [{"method": "lrod", "ratio": 0.2}]})


@pytest.mark.parametrize("stage, key", [({"method": "whiten", "ratio": 1.5}, "stages.0.ratio"),
                                        ({"method": "svd"}, "stages.0"),
                                        ({"method": "svd", "ratio": 0.2, "rank": 3}, "stages.0")])
def test_bad_values_fail_before_any_work(stage, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        parse_recipe({"model": {"path": "m"}, "stages": [stage]})


def test_wrong_type_is_reported_with_the_value():
    with pytest.raises(RecipeError, match=r"calibration\.num_samples.*'many'"):
        parse_recipe({"model": {"path": "m"}, "calibration": {"num_samples": "many"}})


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    path = _write(tmp_path, "model: {path: m}\nstages:\n  - {method: lord, ratio: 0.2}\n")
    recipe = load_recipe(path, ["stages.0.ratio=0.3", "runtime.sequential=false", "output.dir=x/y"])
    assert recipe.stage_config(0).ratio == 0.3
    assert recipe.runtime.sequential is False and recipe.output.dir == "x/y"


def test_override_of_an_unknown_key_is_rejected(tmp_path):
    path = _write(tmp_path, "model: {path: m}\n")
    with pytest.raises(RecipeError, match=r"runtime\.speed: unknown key"):
        load_recipe(path, ["runtime.speed=3"])
    with pytest.raises(RecipeError, match="stages is a list of 0, it has no item 2"):
        apply_overrides({"stages": []}, ["stages.2.ratio=1"], "r.yaml")


def test_missing_recipe_file_names_the_path(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_shipped_recipes_validate():
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(root.glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)


def test_output_matching_options_parse_and_a_blend_outside_0_1_is_refused():
    runtime = {"target": "original", "target_blend": 0.5, "true_sequential": True}
    recipe = parse_recipe({**BASE, "runtime": runtime})
    assert (recipe.runtime.target_blend, recipe.runtime.true_sequential) == (0.5, True)
    assert parse_recipe(BASE).runtime.true_sequential is None       # on with target: original only
    with pytest.raises(RecipeError, match=r"runtime\.target_blend"):
        parse_recipe({**BASE, "runtime": {**runtime, "target_blend": 1.5}})


def test_a_stage_config_is_validated_once_and_follows_its_options():
    recipe = parse_recipe({"model": {"path": "m"}, "stages": [{"method": "whiten", "ratio": 0.2}]})
    assert recipe.stage_config(0) is recipe.stage_config(0)          # parse_recipe's validation is reused
    recipe.stages[0].ratio = 0.3                                     # an option changed after parsing
    assert recipe.stage_config(0).ratio == 0.3


def test_a_budget_expands_listed_options_into_choices():
    recipe = parse_recipe({"model": {"path": "m"}, "budget": {"mib": 140, "choices": [
        {"method": "gptq", "bits": [3, 4], "group_size": [32, 128]}, {"method": "whiten", "rank": 8}]}})
    labels = [label for label, _ in recipe.budget_configs()]
    assert labels == ["gptq bits=3 group_size=32", "gptq bits=3 group_size=128", "gptq bits=4 group_size=32",
                      "gptq bits=4 group_size=128", "whiten rank=8"]
    assert recipe.budget.total_bytes(0, 0) == (140 * 2**20, "140 MiB")
    chained = parse_recipe({"model": {"path": "m"}, "budget": {"mib": 140, "choices": [
        {"method": "rtn", "bits": 3, "then": [{"method": "eora", "rank": [16, 64]}]}]}})
    assert [label for label, _ in chained.budget_configs()] == ["rtn bits=3 + eora rank=16", "rtn bits=3 + eora rank=64"]
    assert [method for method, _ in chained.budget_configs()[1][1]] == ["rtn", "eora"]


@pytest.mark.parametrize("budget, key, words", [
    ("{mib: 140, choices: [{method: rtn, bits: [3, 9]}]}", "budget.choices.0.bits", "less than or equal to 8"),
    ("{mib: 140, choices: [{method: rtn, bitz: 3}]}", "budget.choices.0.bitz", "unknown key"),
    ("{mib: 140, choices: [{method: eora, rank: 4}]}", "budget.choices.0.method", "goes under 'then'"),
    ("{mib: 140, choices: [{method: rtn, then: [{method: eora, rank: [4, 0]}]}]}", "budget.choices.0.then.0.rank",
     "greater than or equal to 1"),
    ("{mib: 140, choices: [{method: rtn, then: [{method: fwsvd, rank: 4}]}]}", "budget.choices.0.then.0.method",
     "needs ['fisher']"),
    ("{mib: 140, bytes: 10, choices: [{method: rtn}]}", "budget", "exactly one of"),
    ("{mib: 140, choices: []}", "budget.choices", "at least 1"),
])
def test_a_bad_budget_names_the_file_and_key(tmp_path, budget, key, words):
    path = _write(tmp_path, f"model: {{path: m}}\nbudget: {budget}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and f"  {key}:" in message and words in message


def test_a_budget_beside_stages_is_refused(tmp_path):
    path = _write(tmp_path, "model: {path: m}\nstages: [{method: rtn}]\nbudget: {mib: 1, choices: [{method: rtn}]}\n")
    with pytest.raises(RecipeError, match="either 'stages' or 'budget'"):
        load_recipe(path)
