import math

import pytest
import torch

from lrcompress.compressor.linalg import rank_for_ratio, relative_output_error, whitening
from helpers import correlated_inputs


@pytest.mark.parametrize("m,n", [(576, 576), (1536, 576), (192, 576), (7, 3)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.2, 0.5, 0.9])
def test_rank_for_ratio_meets_the_ratio(m, n, ratio):
    r = rank_for_ratio(m, n, ratio)
    kept = r * (m + n)
    assert kept <= (1 - ratio) * m * n or r == 1
    # the next rank would exceed the budget: the formula takes the largest admissible rank
    assert (r + 1) * (m + n) > (1 - ratio) * m * n


def test_whitening_cholesky_factor_reproduces_the_gram():
    x = correlated_inputs(400, 24)
    g = x.T @ x
    white = whitening(g, damping=0.0)
    assert white.path.startswith("cholesky")
    torch.testing.assert_close(white.factor @ white.factor.T, g, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(white.factor @ white.inverse, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-8)


def test_whitening_falls_back_to_eigh_for_an_indefinite_gram():
    g = torch.diag(torch.tensor([4.0, 1.0, 0.0, -2.0], dtype=torch.float64))
    white = whitening(g, damping=0.0)
    assert white.path.startswith("eigh-clamped")
    assert torch.isfinite(white.factor).all() and torch.isfinite(white.inverse).all()
    torch.testing.assert_close(white.factor @ white.inverse, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-8)


def test_whitening_raises_damping_before_falling_back():
    # rank-deficient PSD Gram: plain Cholesky fails, a damped one succeeds
    x = correlated_inputs(3, 8)
    g = x.T @ x
    assert int(torch.linalg.cholesky_ex(g)[1]) != 0
    white = whitening(g, damping=1e-12)
    assert white.path.startswith("cholesky")
    assert torch.isfinite(white.inverse).all()


def test_relative_output_error_matches_the_direct_computation():
    x = correlated_inputs(200, 16)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(10, 16, generator=g, dtype=torch.float64)
    direct = torch.linalg.norm(x @ (w - w_hat).T) / torch.linalg.norm(x @ w.T)
    assert math.isclose(relative_output_error(w, w_hat, x.T @ x), direct.item(), rel_tol=1e-9)
