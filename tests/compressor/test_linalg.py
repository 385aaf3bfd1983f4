import math

import pytest
import torch

from lrcompress.compressor.linalg import (matched_output_error, matched_weight, rank_for_ratio, relative_output_error,
                                          shrink_gram,
                                          whitening)
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


def _streams(rows=400, features=12, out=7, seed=0):
    """X (the uncompressed model's inputs), X̂ = X + a nonlinear drift and noise (this run's inputs), and W:
    XWᵀ is not in the column span of X̂, so no W′ reproduces it exactly."""
    g = torch.Generator().manual_seed(seed)
    x = correlated_inputs(rows, features, seed=seed)
    scale = x.std(dim=0)
    drift = torch.tanh(x / scale @ torch.randn(features, features, generator=g, dtype=torch.float64)) * scale
    x_hat = x + 0.3 * drift + 0.05 * scale * torch.randn(rows, features, generator=g, dtype=torch.float64)
    w = torch.randn(out, features, generator=g, dtype=torch.float64)
    return x, x_hat, w


def test_matched_weight_is_the_least_squares_solution():
    x, x_hat, w = _streams()
    target, path = matched_weight(w, x_hat.T @ x_hat, x.T @ x_hat, damping=0.0)
    brute = torch.linalg.lstsq(x_hat, x @ w.T).solution.T          # argmin ‖X̂W′ᵀ − XWᵀ‖
    torch.testing.assert_close(target, brute, rtol=1e-7, atol=1e-9)
    assert path == "cholesky(damping=0e+00)"


def test_matched_weight_damping_is_a_ridge_toward_w():
    x, x_hat, w = _streams(rows=30, features=12)    # few rows: the ridge matters
    lam = 0.05
    s = torch.diagonal(x_hat.T @ x_hat).mean()
    target, _ = matched_weight(w, x_hat.T @ x_hat, x.T @ x_hat, damping=lam)
    # argmin ‖X̂W′ᵀ − XWᵀ‖² + λs‖W′ − W‖² as one stacked least-squares problem
    root = math.sqrt(lam * s)
    a = torch.cat([x_hat, root * torch.eye(12, dtype=torch.float64)])
    b = torch.cat([x @ w.T, root * w.T])
    torch.testing.assert_close(target, torch.linalg.lstsq(a, b).solution.T, rtol=1e-7, atol=1e-9)


def test_matched_weight_is_w_when_the_streams_agree():
    x, _, w = _streams()
    target, _ = matched_weight(w, x.T @ x, x.T @ x, damping=0.01)
    torch.testing.assert_close(target, w, rtol=1e-9, atol=1e-10)


def test_the_matched_error_is_the_whitened_error_to_w_star_plus_a_constant():
    """‖X̂Ŵᵀ − XWᵀ‖² = ‖X̂(Ŵ − W*)ᵀ‖² + const for every Ŵ (undamped W*)."""
    x, x_hat, w = _streams()
    target, _ = matched_weight(w, x_hat.T @ x_hat, x.T @ x_hat, damping=0.0)
    gaps = []
    for seed in range(3):
        approx = w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        matched = (x_hat @ approx.T - x @ w.T).square().sum()
        whitened = (x_hat @ (approx - target).T).square().sum()
        gaps.append(float(matched - whitened))
    assert gaps[0] > 1e-3 * float((x @ w.T).square().sum())      # a real constant: XWᵀ is out of reach
    assert gaps == pytest.approx([gaps[0]] * 3, rel=1e-8)


def test_matched_output_error_matches_the_direct_computation():
    x, x_hat, w = _streams()
    approx = w + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    direct = ((x_hat @ approx.T - x @ w.T).norm() / (x @ w.T).norm()).item()
    error = matched_output_error(w, approx, x_hat.T @ x_hat, x.T @ x_hat, x.T @ x)
    assert error == pytest.approx(direct, rel=1e-9)


def test_shrink_gram_blends_toward_the_diagonal_and_zero_returns_the_gram():
    x = correlated_inputs(200, 12)
    g = x.T @ x
    assert shrink_gram(g, 0.0) is g
    half = shrink_gram(g, 0.5)
    torch.testing.assert_close(torch.diagonal(half), torch.diagonal(g))            # channel scales kept
    off = ~torch.eye(12, dtype=torch.bool)
    torch.testing.assert_close(half[off], 0.5 * g[off])                              # correlations halved
    torch.testing.assert_close(shrink_gram(g, 1.0), torch.diag(torch.diagonal(g)))
    with pytest.raises(ValueError, match="shrinkage"):
        shrink_gram(g, 1.5)
