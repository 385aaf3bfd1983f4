"""prune: exact N:M and unstructured patterns, Wanda's score against an independent computation."""
import pytest
import torch
from torch import nn

from lrcompress.compressor import GramStatistic, get_compressor
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.errors import RecipeError
from lrcompress.modules import MaskedSparseLinear, NMSparseLinear, dense_weight
from lrcompress.recipe import parse_recipe
from helpers import compress_with, observed_linear

OUT, IN = 12, 32


def _layer(seed=0):
    return observed_linear(300, OUT, IN, seed)


def _prune(linear, gram, **options):
    return compress_with("prune", linear, {"gram": gram}, name="m", **options)


@pytest.mark.parametrize("scoring", ["magnitude", "wanda"])
def test_two_four_keeps_exactly_the_two_best_of_every_four(scoring):
    x, linear, gram = _layer()
    module = _prune(linear, gram, scoring=scoring, pattern="2:4")
    assert isinstance(module, NMSparseLinear)
    w = linear.weight.detach()
    kept = dense_weight(module) != 0
    assert torch.equal(kept.view(OUT, IN // 4, 4).sum(-1), torch.full((OUT, IN // 4), 2))
    norms = x.pow(2).sum(0).sqrt()  # ‖X_j‖₂ straight from the inputs
    for i in range(OUT):
        for g in range(IN // 4):
            cols = range(4 * g, 4 * g + 4)
            score = [abs(w[i, j].item()) * (norms[j].item() if scoring == "wanda" else 1.0) for j in cols]
            best = sorted(sorted(range(4), key=lambda k: -score[k])[:2])
            assert [k for k in range(4) if kept[i, 4 * g + k]] == best
    assert torch.equal(dense_weight(module)[kept], w.float()[kept].double().to(dense_weight(module).dtype))


def test_unstructured_wanda_prunes_each_row_and_beats_magnitude():
    """Inputs with outlier features (norms spread over two decades), the case Wanda was made for."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, IN, generator=g, dtype=torch.float64) * torch.logspace(0, 2, IN, dtype=torch.float64)[
        torch.randperm(IN, generator=g)]
    linear = nn.Linear(IN, OUT, bias=False).double()
    gram = GramStatistic(IN)
    gram.observe(x, linear(x))
    wanda = _prune(linear, gram, scoring="wanda", sparsity=0.5)
    magnitude = _prune(linear, gram, scoring="magnitude", sparsity=0.5)
    assert isinstance(wanda, MaskedSparseLinear)
    assert torch.equal((dense_weight(wanda) != 0).sum(1), torch.full((OUT,), IN // 2))
    assert int((dense_weight(magnitude) != 0).sum()) == OUT * IN // 2
    g = gram.gram("m")
    err_wanda = relative_output_error(linear.weight, dense_weight(wanda), g)
    err_magnitude = relative_output_error(linear.weight, dense_weight(magnitude), g)
    assert err_wanda < 0.8 * err_magnitude


def test_magnitude_matrix_threshold_is_global():
    _, linear, gram = _layer(seed=2)
    module = _prune(linear, gram, scoring="magnitude", sparsity=0.75)
    w = linear.weight.detach().abs()
    threshold = torch.sort(w.reshape(-1), descending=True).values[OUT * IN // 4 - 1]
    assert torch.equal(dense_weight(module) != 0, w >= threshold)


def test_sparse_storage_really_shrinks():
    _, linear, gram = _layer()
    dense_bytes = OUT * IN * 8
    nm = _prune(linear, gram, pattern="2:4")
    unstructured = _prune(linear, gram, sparsity=0.5)
    assert nm.storage_bytes() == OUT * IN // 2 * 8 + OUT * IN // 2 * 2 // 8   # values + 2-bit indices
    assert unstructured.storage_bytes() == OUT * IN // 2 * 8 + OUT * IN // 8  # values + 1-bit mask
    assert max(nm.storage_bytes(), unstructured.storage_bytes()) < 0.6 * dense_bytes


def test_bad_options_are_recipe_errors():
    base = {"model": {"path": "m"}}
    for stage, message in [({"method": "prune"}, "exactly one"),
                           ({"method": "prune", "pattern": "4:2"}, "0 < N < M"),
                           ({"method": "prune", "sparsity": 0.5, "pattern": "2:4"}, "exactly one")]:
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**base, "stages": [stage]})


@pytest.mark.parametrize("options", [{"pattern": "2:4"}, {"sparsity": 0.3}, {"sparsity": 0.3, "scoring": "magnitude"},
                                     {"sparsity": 0.7, "comparison": "row", "scoring": "magnitude"}])
def test_plan_predicts_the_stored_values(options):
    _, linear, gram = _layer()
    cls = get_compressor("prune")
    compressor = cls(cls.Config(**options))
    module = compressor.compress("m", linear, {"gram": gram}).module
    assert compressor.plan(linear).params_after == module.stored_params() == int((dense_weight(module) != 0).sum())
