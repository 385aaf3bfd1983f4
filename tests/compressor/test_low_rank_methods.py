"""svd, whiten and lord against independent closed forms on random correlated inputs."""
import pytest
import torch
from torch import nn

from lrcompress.compressor import COMPRESSORS, GramStatistic, get_compressor
from lrcompress.modules import LowRankLinear, dense_weight
from helpers import compress_with, observed_linear

OUT, IN, RANK = 24, 32, 6


def _setup(seed=0, bias=False):
    return observed_linear(512, OUT, IN, seed, bias)


def _compress(method, linear, gram, **options):
    return compress_with(method, linear, {"gram": gram}, rank=RANK, **options)


def _output_error(x, linear, module):
    return torch.linalg.norm(x @ (linear.weight - dense_weight(module)).T).item()


def _optimal_error(x, weight, rank):
    """Eckart–Young on XWᵀ: the best any rank-r Ŵ can do is the tail of XWᵀ's singular values."""
    s = torch.linalg.svdvals(x @ weight.T)
    return s[rank:].pow(2).sum().sqrt().item()


def test_svd_is_the_best_weight_space_approximation():
    _, linear, gram = _setup()
    module = _compress("svd", linear, gram)
    s = torch.linalg.svdvals(linear.weight.detach())
    err = torch.linalg.norm(linear.weight - dense_weight(module)).item()
    assert err == pytest.approx(s[RANK:].pow(2).sum().sqrt().item(), rel=1e-9)


@pytest.mark.parametrize("method", ["whiten", "lord"])
def test_data_aware_methods_beat_svd_and_reach_the_closed_form_optimum(method):
    x, linear, gram = _setup()
    options = {"damping": 0.0} if method == "whiten" else {}
    data_aware = _output_error(x, linear, _compress(method, linear, gram, **options))
    plain = _output_error(x, linear, _compress("svd", linear, gram))
    optimum = _optimal_error(x, linear.weight.detach(), RANK)
    assert data_aware < 0.7 * plain
    assert data_aware == pytest.approx(optimum, rel=1e-6)


def test_full_rank_low_rank_linear_reproduces_the_dense_layer():
    x, linear, gram = _setup(bias=True)
    compressor = get_compressor("svd")(get_compressor("svd").Config(rank=min(OUT, IN)))
    module = compressor.compress("m", linear, {"gram": gram}).module
    assert isinstance(module, LowRankLinear)
    torch.testing.assert_close(module(x), linear(x), rtol=1e-10, atol=1e-10)


def test_lord_keeps_the_bias_and_center_folds_the_mean():
    x, linear, gram = _setup(bias=True)
    x = x + 3.0  # strong input mean: the centered variant should win
    gram = GramStatistic(IN)
    gram.observe(x, linear(x))
    plain = _compress("lord", linear, gram)
    centered = _compress("lord", linear, gram, center=True)
    torch.testing.assert_close(plain.bias, linear.bias)

    def output_error(module):
        return torch.linalg.norm(linear(x) - module(x)).item()

    # centered: optimal covariance error and zero mean error, so its total error cannot be larger
    assert output_error(centered) < output_error(plain)


@pytest.mark.parametrize("method", ["whiten", "lord"])
def test_singular_gram_still_gives_finite_factors(method):
    linear = nn.Linear(IN, OUT).double()
    gram = GramStatistic(IN)
    x = torch.zeros(10, IN, dtype=torch.float64)
    x[:, 0] = 1.0  # a Gram of rank one
    gram.observe(x, linear(x))
    module = _compress(method, linear, gram)
    assert torch.isfinite(dense_weight(module)).all()


def test_all_low_rank_methods_are_registered():
    assert {"svd", "whiten", "lord"} <= set(COMPRESSORS)
    assert "asvd" not in COMPRESSORS          # ASVD (diagonal scaling + rank search) is another method
