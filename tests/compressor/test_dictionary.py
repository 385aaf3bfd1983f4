"""Batched OMP, K-SVD and the least-squares refit against independent computations."""
from __future__ import annotations

import pytest
import torch

from lrcompress.compressor.dictionary import (_block_factor, _omp_chunk, _omp_chunk_gram_schmidt, _sequential_factor,
                                              batched_omp, dense_codes, ksvd,
                                              orthogonal_dictionary,
                                              refit_values, sparsity_budget,
                                              update_atom)


def synthetic(n: int = 64, k: int = 48, s: int = 4, cols: int = 400, seed: int = 0):
    """W = D₀·S₀ with random unit atoms and exactly s-sparse columns (float64)."""
    g = torch.Generator().manual_seed(seed)
    d0 = torch.randn(n, k, generator=g, dtype=torch.float64)
    d0 /= d0.norm(dim=0)
    s0 = torch.zeros(k, cols, dtype=torch.float64)
    for j in range(cols):
        support = torch.randperm(k, generator=g)[:s]
        magnitude = 1 + torch.rand(s, generator=g, dtype=torch.float64)
        sign = torch.randint(0, 2, (s,), generator=g) * 2 - 1
        s0[support, j] = magnitude * sign
    return d0, s0


def naive_omp(d: torch.Tensor, x: torch.Tensor, s: int, per_step: int = 1) -> tuple[list[int], torch.Tensor]:
    """Textbook OMP for one column: pick argmax |Dᵀr|, refit by least squares, repeat. With ``per_step``
    > 1, generalized OMP: pick the ``per_step`` largest |Dᵀr| (fewer in the last step) at once."""
    support: list[int] = []
    residual = x.clone()
    coef = torch.zeros(0, dtype=x.dtype)
    while len(support) < s:
        scores = (d.T @ residual).abs()
        scores[support] = -1
        support += scores.argsort(descending=True)[: min(per_step, s - len(support))].tolist()
        coef = torch.linalg.lstsq(d[:, support], x.unsqueeze(1)).solution.squeeze(1)
        residual = x - d[:, support] @ coef
    return support, coef


def test_omp_recovers_the_true_sparse_code_exactly():
    d0, s0 = synthetic()
    x = d0 @ s0
    indices, values = batched_omp(d0.T @ d0, d0.T @ x, 4)
    recovered = dense_codes(indices, values, d0.shape[1])
    assert torch.equal(recovered != 0, s0 != 0)                       # the supports
    assert torch.allclose(recovered, s0, atol=1e-10, rtol=0)          # and the values


def test_omp_matches_textbook_omp_and_least_squares_on_its_support():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(20, 31, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0)
    x = torch.randn(20, 17, generator=g, dtype=torch.float64)          # not sparse at all
    indices, values = batched_omp(d.T @ d, d.T @ x, 7)
    for j in range(x.shape[1]):
        support, coef = naive_omp(d, x[:, j], 7)
        assert indices[:, j].tolist() == support
        brute = torch.linalg.lstsq(d[:, indices[:, j]], x[:, j:j + 1]).solution.squeeze(1)
        assert torch.allclose(values[:, j], brute, atol=1e-9)
        assert torch.allclose(values[:, j], coef, atol=1e-9)


@pytest.mark.parametrize("per_step", [2, 3, 5, 7])
def test_generalized_omp_matches_its_textbook_form(per_step):
    """Several atoms a step (7 = s: one step), the last step partial (7 = 5 + 2, 3 + 3 + 1)."""
    g = torch.Generator().manual_seed(11)
    d = torch.randn(20, 31, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0)
    x = torch.randn(20, 17, generator=g, dtype=torch.float64)
    indices, values = batched_omp(d.T @ d, d.T @ x, 7, atoms_per_step=per_step)
    for j in range(x.shape[1]):
        support, coef = naive_omp(d, x[:, j], 7, per_step)
        assert indices[:, j].tolist() == support
        assert torch.allclose(values[:, j], coef, atol=1e-9)


@pytest.mark.parametrize("per_step", [1, 3, 4])
def test_generalized_omp_decouples_atoms_beyond_the_signal_dimension(per_step):
    """In 5 dimensions the 6th atom onward lies in the span of the chosen ones: each such atom gets a zero
    value, the atoms stay distinct, and the code still represents the column exactly."""
    g = torch.Generator().manual_seed(12)
    d = torch.randn(5, 12, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    indices, values = batched_omp(d.T @ d, d.T @ x, 8, atoms_per_step=per_step)
    assert all(len(set(indices[:, j].tolist())) == 8 for j in range(9))
    assert torch.allclose(d @ dense_codes(indices, values, 12), x, atol=1e-9)
    assert (values[5:] == 0).all()                   # past five independent atoms nothing is left to fit
    naive = [naive_omp(d, x[:, j], 5, per_step)[0] for j in range(9)]
    assert [indices[:5, j].tolist() for j in range(9)] == naive


def test_the_block_factor_is_cholesky_and_its_fallback_agrees():
    """The batched Cholesky of a pursuit step and its one-pivot-at-a-time fallback give one factor;
    a block with a repeated direction falls back and decouples the repeat (row [0, 1])."""
    g = torch.Generator().manual_seed(13)
    a = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    cross = a @ a.mT + 0.1 * torch.eye(4, dtype=torch.float64)
    diagonal = torch.diagonal(cross, dim1=1, dim2=2).clone()
    factor, independent = _block_factor(cross, diagonal)
    assert independent.all() and torch.allclose(factor, torch.linalg.cholesky(cross), atol=1e-12)
    assert torch.allclose(_sequential_factor(cross, diagonal)[0], factor, atol=1e-12)
    v = torch.randn(3, 8, generator=g, dtype=torch.float64)
    vectors = torch.stack([v[0], v[1], v[0], v[2]])                   # the third repeats the first
    degenerate = (vectors @ vectors.T).unsqueeze(0)
    factor, independent = _block_factor(degenerate, torch.diagonal(degenerate, dim1=1, dim2=2))
    assert independent.tolist() == [[True, True, False, True]]
    assert factor[0, 2].tolist() == [0.0, 0.0, 1.0, 0.0]
    kept = (independent[0, :, None] & independent[0, None, :]).double()
    assert torch.allclose((factor[0] @ factor[0].T) * kept, degenerate[0] * kept, atol=1e-10)


def test_omp_on_an_orthonormal_dictionary_keeps_the_largest_projections():
    q, _ = torch.linalg.qr(torch.randn(30, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(30, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    indices, values = batched_omp(q.T @ q, q.T @ x, 5)
    for j in range(x.shape[1]):
        support, coef = naive_omp(q, x[:, j], 5)
        assert indices[:, j].tolist() == support
        assert torch.allclose(values[:, j], coef, atol=1e-10)


def test_omp_column_exactly_represented_early_gets_zero_values_on_distinct_atoms():
    d = torch.eye(6, dtype=torch.float64)[:, :5] + 0.1
    d /= d.norm(dim=0)
    x = 2.0 * d[:, 3:4]                                                # 1-sparse, asked for 3
    indices, values = batched_omp(d.T @ d, d.T @ x, 3)
    assert indices[0, 0] == 3 and len(set(indices[:, 0].tolist())) == 3
    assert torch.allclose(dense_codes(indices, values, 5)[:, 0], torch.tensor([0, 0, 0, 2.0, 0], dtype=torch.float64))


def test_ksvd_recovers_most_atoms_from_its_default_initialization():
    d0, s0 = synthetic()
    result = ksvd(d0 @ s0, 48, 4, iterations=30)
    cos = (result.dictionary.T @ d0).abs().max(dim=0).values           # best learned match per true atom
    assert (cos > 0.99).double().mean() >= 0.85
    # the path of 30 iterations is chaotic under round-off: its best error lands between 0.116 and 0.185
    # (from 0.648) depending on the thread count that sums the GEMMs
    assert result.errors[result.best] * 3 <= result.errors[0]
    assert torch.allclose(result.dictionary.norm(dim=0), torch.ones(48, dtype=torch.float64))


def test_each_atom_update_never_increases_the_error():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 60, generator=g, dtype=torch.float64)
    d = torch.randn(24, 16, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0)
    indices, values = batched_omp(d.T @ d, d.T @ x, 3)
    codes = dense_codes(indices, values, 16)
    residual = x - d @ codes
    error = residual.norm().item()
    for j in range(16):
        update_atom(d, codes, residual, j, power_steps=1)
        assert torch.allclose(residual, x - d @ codes, atol=1e-10)   # the residual stays consistent
        new_error = residual.norm().item()
        assert new_error <= error + 1e-12
        error = new_error


def test_an_atom_update_with_enough_power_steps_is_k_svds_exact_rank_1_update():
    """K-SVD (Aharon et al., 2006) replaces atom j and its coefficients by the top singular pair of the
    residual block E_ω = R_ω + d_j·c_jᵀ on the columns that use it: the error left on those columns is then
    ‖E_ω‖² − σ₁². One power step only approaches that; enough steps reach it."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(24, 60, generator=g, dtype=torch.float64)
    start = torch.randn(24, 16, generator=g, dtype=torch.float64)
    start /= start.norm(dim=0)
    indices, values = batched_omp(start.T @ start, start.T @ x, 3)
    left = {}
    for steps in (1, 200):
        d, codes = start.clone(), dense_codes(indices, values, 16)
        residual = x - d @ codes
        j = int((codes != 0).sum(dim=1).argmax())
        users = codes[j] != 0
        block = (residual + torch.outer(d[:, j], codes[j]))[:, users]
        top = torch.linalg.svdvals(block)[0]
        update_atom(d, codes, residual, j, power_steps=steps)
        left[steps] = float(residual[:, users].square().sum())
        exact = float(block.square().sum() - top.square())
    assert left[200] == pytest.approx(exact, rel=1e-6)          # power iteration stops at POWER_TOL = 1e-7
    assert left[1] > left[200]


def test_refit_values_is_least_squares_in_the_given_metric():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(10, 8, generator=g, dtype=torch.float64)
    w = torch.randn(10, 6, generator=g, dtype=torch.float64)
    a = torch.randn(30, 10, generator=g, dtype=torch.float64)
    metric = a.T @ a
    indices = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(6)], dim=1)
    values, failures = refit_values(d.T @ metric @ d, d.T @ metric @ w, indices, ridge=0.0)
    assert failures == 0
    for j in range(6):
        brute = torch.linalg.lstsq(a @ d[:, indices[:, j]], (a @ w[:, j]).unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(values[:, j], brute, atol=1e-9)


@pytest.mark.parametrize("d_in,d_out,ratio,group,cost", [(576, 1536, 0.2, 1, 0.5), (64, 160, 0.3, 2, 1.0),
                                                         (1536, 576, 0.5, 3, 0.0)])
def test_sparsity_budget_is_the_largest_s_that_fits(d_in, d_out, ratio, group, cost):
    def cost_of(s):
        return 2 * s * d_in / group + s * d_out * (1 + cost)
    s = sparsity_budget(d_in, d_out, ratio, 2.0, group, cost)
    assert cost_of(s) <= (1 - ratio) * d_in * d_out < cost_of(s + 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_gram_schmidt_pursuit_equals_the_step_kernel_form(dtype):
    """The CPU pursuit (P = Dᵀq) and the form of the Triton step kernel (L⁻¹ + a GEMM) are one OMP.

    Columns 0–9 lie in the span of 3 atoms, so the pursuit runs out of independent atoms (zero slots)."""
    g = torch.Generator().manual_seed(3)
    d = torch.randn(20, 40, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0)
    x = torch.randn(20, 60, generator=g, dtype=torch.float64)
    x[:, :10] = d[:, :3] @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    gram, correlations = (d.T @ d).to(dtype), (d.T @ x).to(dtype)
    fast = _omp_chunk_gram_schmidt(gram, correlations.T.contiguous(), 12)
    step = _omp_chunk(gram, correlations.T.contiguous(), 12)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.equal(fast[0][:, 10:], step[0][:, 10:])
    assert torch.allclose(fast[1][:, 10:], step[1][:, 10:], atol=tol)
    # exact columns: the same 3 atoms first; past that the residual is round-off and the picks may differ
    assert torch.equal(fast[0][:3, :10].sort(dim=0).values, step[0][:3, :10].sort(dim=0).values)
    for idx, val in (fast, step):
        assert torch.allclose(dense_codes(idx[:, :10], val[:, :10], 40), dense_codes(step[0][:, :10], step[1][:, :10], 40),
                              atol=tol)


@pytest.mark.parametrize("per_step", [1, 4])
def test_pursuit_and_refit_give_the_same_answer_in_chunks_of_any_size(monkeypatch, per_step):
    """Chunking the columns (sized to fit the cache) must not change a single pick or value."""
    import lrcompress.compressor.dictionary as dictionary

    g = torch.Generator().manual_seed(6)
    d = torch.randn(16, 24, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0)
    x = torch.randn(16, 37, generator=g, dtype=torch.float64)
    whole = batched_omp(d.T @ d, d.T @ x, 6, per_step)
    refit = refit_values(d.T @ d, d.T @ x, whole[0])[0]
    monkeypatch.setattr(dictionary, "GS_CHUNK_BYTES", 6 * 24 * 8 * 5)           # 5 columns a chunk
    monkeypatch.setattr(dictionary, "REFIT_CHUNK_BYTES", 6 * 6 * 8 * 3)         # 3 columns a chunk
    chunked = batched_omp(d.T @ d, d.T @ x, 6, per_step)
    assert torch.equal(whole[0], chunked[0]) and torch.allclose(whole[1], chunked[1], atol=1e-12, rtol=0)
    assert torch.allclose(refit_values(d.T @ d, d.T @ x, whole[0])[0], refit, atol=1e-12, rtol=0)
    assert torch.allclose(refit, whole[1], atol=1e-9)      # same dictionary: the refit is OMP's own least squares


def test_ksvd_returns_its_best_iteration_consistently():
    """The returned dictionary, indices and values are one iteration's, and the one with the least error."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 90, generator=g, dtype=torch.float64)
    result = ksvd(x, 30, 5, iterations=6)
    assert len(result.errors) == 6 and not result.stopped_early
    assert result.errors[result.best] == min(result.errors)
    approx = result.dictionary @ dense_codes(result.indices, result.values, 30)
    assert abs((x - approx).norm().item() / x.norm().item() - result.errors[result.best]) < 1e-12


def test_ksvd_stops_when_the_error_stops_improving_by_the_tolerance():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 90, generator=g, dtype=torch.float64)
    full = ksvd(x, 30, 5, iterations=6)
    gains = [(a - b) / a for a, b in zip(full.errors, full.errors[1:])]
    tolerance = (gains[0] + gains[1]) / 2 if gains[1] < gains[0] else gains[0] * 2     # between the two first gains
    early = ksvd(x, 30, 5, iterations=6, tolerance=tolerance)
    stop = next(i for i, gain in enumerate(gains) if gain <= tolerance) + 2   # iterations run when it stops
    assert early.stopped_early and early.errors == full.errors[:stop]


def test_ksvd_in_float32_tracks_float64():
    """float32 sparse coding and atom updates: the same K-SVD up to round-off (the error within 0.1%; a
    near-tie in the greedy pick can go the other way, so not bit for bit)."""
    d0, s0 = synthetic(n=32, k=24, s=3, cols=150, seed=4)
    x = d0 @ s0 + 0.05 * torch.randn(32, 150, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    double = ksvd(x, 24, 3, iterations=3)
    single = ksvd(x, 24, 3, iterations=3, dtype=torch.float32)
    assert single.dictionary.dtype == torch.float64 and single.values.dtype == torch.float64
    assert torch.allclose(torch.tensor(single.errors), torch.tensor(double.errors), rtol=1e-3, atol=0)


def test_an_orthonormal_dictionary_in_float32_still_skips_the_pursuit(monkeypatch):
    """K-SVD's SVD start is orthonormal in float64; cast to float32 it must still take the top-s shortcut."""
    import lrcompress.compressor.dictionary as dictionary

    q, _ = torch.linalg.qr(torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(10)))
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    monkeypatch.setattr(dictionary, "_omp_chunk_gram_schmidt", None)      # any call to the pursuit fails
    q32, x32 = q.float(), x.float()
    indices, values = batched_omp(q32.T @ q32, q32.T @ x32, 6)
    assert torch.equal(indices, (q.T @ x).abs().topk(6, dim=0).indices)


def test_orthogonal_dictionary_alternates_two_exact_minimizers():
    """Orthonormal atoms, top-s codes, least-squares values and an error that never rises."""
    g = torch.Generator().manual_seed(12)
    basis, _ = torch.linalg.qr(torch.randn(30, 20, generator=g, dtype=torch.float64))
    codes = torch.zeros(20, 200, dtype=torch.float64)
    for j in range(200):
        codes[torch.randperm(20, generator=g)[:4], j] = 1 + torch.rand(4, generator=g, dtype=torch.float64)
    x = basis @ codes + 0.3 * torch.randn(30, 200, generator=g, dtype=torch.float64)
    result = orthogonal_dictionary(x, 20, 4, iterations=8)
    d = result.dictionary
    assert torch.allclose(d.T @ d, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert all(b <= a + 1e-12 for a, b in zip(result.errors, result.errors[1:]))
    projections = d.T @ x                           # for orthonormal atoms, least squares on a support
    assert torch.allclose(result.values, projections.gather(0, result.indices))
    approx = d @ dense_codes(result.indices, result.values, 20)
    assert abs((x - approx).norm().item() / x.norm().item() - result.errors[-1]) < 1e-12
    first = torch.linalg.svd(x, full_matrices=False)[0][:, :20]   # the first code: top-4 projections on the start
    one = orthogonal_dictionary(x, 20, 4, iterations=1)
    assert torch.equal(one.indices.sort(dim=0).values, (first.T @ x).abs().topk(4, dim=0).indices.sort(dim=0).values)
    assert result.errors[-1] < 0.95 * result.errors[0]
    with pytest.raises(ValueError, match="at most n"):
        orthogonal_dictionary(x, 31, 4, iterations=1)
