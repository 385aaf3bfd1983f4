"""The recipe's ``embedding`` key: validated with messages naming the file and key, off by default without
changing any earlier recipe's fingerprint, settable with --set, and enough on its own to make a recipe."""
import pytest

from lrcompress.errors import RecipeError
from lrcompress.recipe import EmbeddingSpec, apply_overrides, parse_recipe

BASE = {"model": {"path": "m"}, "stages": [{"method": "rtn", "bits": 4}]}


@pytest.mark.parametrize("embedding, message", [
    ({"bits": 9}, "embedding.bits: Input should be less than or equal to 8 (got 9)"),
    ({"bits": 1}, "embedding.bits: Input should be greater than or equal to 2 (got 1)"),
    ({"group_size": 0}, "embedding.group_size: Input should be greater than or equal to 1 (got 0)"),
    ({"bits": 8, "gruop_size": 32}, "embedding.gruop_size: unknown key"),
    ({"scale_dtype": "int8"}, "embedding.scale_dtype: Input should be 'float16', 'bfloat16' or 'float32'"),
    ("yes", "embedding: Input should be a valid dictionary"),
])
def test_invalid_settings_name_the_file_and_key(embedding, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe({**BASE, "embedding": embedding}, "recipes/mine.yaml")
    assert str(error.value).startswith("recipes/mine.yaml: invalid recipe")
    assert message in str(error.value)


def test_defaults_and_the_grid():
    recipe = parse_recipe({**BASE, "embedding": {}})
    assert recipe.embedding == EmbeddingSpec(bits=8, group_size=128, symmetric=False, scale_dtype="float16",
                                             untied_lm_head=True)
    grid = recipe.embedding.grid()
    assert (grid.bits, grid.group_size, grid.scale_dtype) == (8, 128, "float16")
    assert parse_recipe({**BASE, "embedding": None}).embedding is None


def test_without_the_key_a_recipe_dumps_and_fingerprints_as_before():
    plain = parse_recipe(BASE)
    assert "embedding" not in plain.model_dump()
    assert plain.fingerprint() != parse_recipe({**BASE, "embedding": {"bits": 8}}).fingerprint()


def test_set_creates_the_section():
    data = apply_overrides({**BASE}, ["embedding.bits=4", "embedding.group_size=32"], "r.yaml")
    assert parse_recipe(data).embedding.bits == 4 and parse_recipe(data).embedding.group_size == 32


def test_a_recipe_with_neither_stages_nor_embedding_is_refused(tmp_path):
    from lrcompress.preflight import preflight

    with pytest.raises(RecipeError, match="no stages"):
        preflight(parse_recipe({"model": {"path": "m"}}), [], tmp_path)
