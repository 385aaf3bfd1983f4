"""Expert merging algorithms (compressor/expert_merge.py) against closed forms and brute force: k-means,
hierarchical clustering, the union-SVD merge (truncated by rank or energy) and its whitened form
(Sub-MoE), RegMean, the frequency weights."""
import pytest
import torch

from lrcompress.compressor.expert_merge import (average_merge, energy_rank, hierarchical_clusters, kmeans,
                                                merge_weights, most_frequent, regmean_merge, union_svd_factors,
                                                union_svd_merge)
from lrcompress.compressor.linalg import whitening


def test_kmeans_recovers_separated_groups_whatever_the_seed():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64) * 10
    truth = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1])
    points = centers[truth] + 0.01 * torch.randn(10, 5, generator=g, dtype=torch.float64)
    for seed in range(5):
        labels = kmeans(points, 3, seed)
        assert torch.equal(labels, torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1]))


def test_kmeans_never_leaves_a_cluster_empty():
    points = torch.zeros(6, 2, dtype=torch.float64)      # all identical: k-means++ has no spread
    labels = kmeans(points, 3, seed=0)
    assert sorted(torch.bincount(labels, minlength=3).tolist()) == [1, 1, 4]


def test_union_svd_merge_full_rank_is_the_frequency_weighted_average():
    """U Σ V_iᵀ = W_i and the V merge is linear, so the untruncated subspace merge is Σ w_i W_i."""
    w3 = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(union_svd_merge(w3, w), (w[:, None, None] * w3).sum(0))
    torch.testing.assert_close(average_merge(w3, w), (w[:, None, None] * w3).sum(0))


def test_union_svd_merge_truncated_projects_the_average_on_the_shared_subspace():
    w3 = torch.randn(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    u = torch.linalg.svd(torch.cat(list(w3), dim=1)).U[:, :2]       # top-2 left vectors of [W_1 W_2 W_3]
    expected = u @ u.T @ (w[:, None, None] * w3).sum(0)
    torch.testing.assert_close(union_svd_merge(w3, w, rank=2), expected)


def test_merging_identical_experts_is_exact():
    one = torch.randn(5, 3, dtype=torch.float64)
    for w in (torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])):
        torch.testing.assert_close(union_svd_merge(torch.stack([one, one]), w.double()), one)


def test_merge_weights_and_most_frequent():
    f = torch.tensor([0.1, 0.0, 0.3, 0.3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(merge_weights(f, [0, 2]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(merge_weights(f, [1, 4]), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert most_frequent(f, 3) == [0, 2, 3]


def _spd_gram(n, tokens, seed, scales=None):
    """XᵀX of ``tokens`` anisotropic rows (column scales ``scales``), and X itself."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x = x * (scales if scales is not None else torch.logspace(0, -2, n, dtype=torch.float64))
    return x.T @ x, x


def test_whitened_union_svd_at_full_rank_is_the_untruncated_merge():
    g = torch.Generator().manual_seed(5)
    w3 = torch.randn(3, 6, 4, dtype=torch.float64, generator=g)
    w = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    whites = [whitening(_spd_gram(4, 20, seed)[0], 1e-4) for seed in range(3)]
    u, s, vt = union_svd_factors(w3, w, rank=min(6, 3 * 4), whitenings=whites)
    torch.testing.assert_close((u * s) @ vt, union_svd_merge(w3, w))


def _member_errors(weights, xs, rank, whitenings):
    """Σ_i ‖X_i (W_i − U_r Σ_r V_iᵀ)ᵀ‖² with member i's own reconstruction (merge weight e_i)."""
    total = 0.0
    for i, x in enumerate(xs):
        one_hot = torch.zeros(len(xs), dtype=torch.float64)
        one_hot[i] = 1.0
        u, s, vt = union_svd_factors(weights, one_hot, rank, whitenings)
        total += float((x @ (weights[i] - (u * s) @ vt).T).pow(2).sum())
    return total


def test_whitened_truncation_has_lower_routed_token_error_than_unwhitened():
    """The whitened union SVD minimizes the members' routed-token output error; the plain one does not."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(12, 16, dtype=torch.float64, generator=g)
    weights = torch.stack([base + 0.1 * torch.randn(12, 16, dtype=torch.float64, generator=g) for _ in range(2)])
    grams, xs = zip(*[_spd_gram(16, 200, seed) for seed in (7, 8)])
    whites = [whitening(gram, 0.0) for gram in grams]
    w = torch.tensor([0.6, 0.4], dtype=torch.float64)
    for rank in (2, 4, 8):
        assert _member_errors(weights, xs, rank, whites) < 0.8 * _member_errors(weights, xs, rank, None)
        merged = {}
        for label, white in (("whitened", whites), ("plain", None)):
            u, s, vt = union_svd_factors(weights, w, rank, white)
            merged[label] = sum(wi * float((x @ (wi_w - (u * s) @ vt).T).pow(2).sum())
                                for wi, x, wi_w in zip(w.tolist(), xs, weights))
        assert merged["whitened"] < merged["plain"]


# --- RegMean, the energy rule, hierarchical clustering ----------------------------------------------

def _members(n=3, out=5, inp=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(n, out, inp, generator=g, dtype=torch.float64)
    inputs = [torch.randn(7 + 3 * i, inp, generator=g, dtype=torch.float64) for i in range(n)]
    gates = [torch.rand(len(x), generator=g, dtype=torch.float64) + 0.05 for x in inputs]
    return weights, inputs, gates


def test_regmean_equals_brute_force_gate_weighted_least_squares():
    weights, inputs, gates = _members()
    grams = torch.stack([x.T @ (gate[:, None] * x) for x, gate in zip(inputs, gates)])
    merged, added = regmean_merge(weights, grams, damping=0.0)
    # min_W Σ_i Σ_t g_t ‖W x_t − W_i x_t‖²: stacked least squares on √g-scaled rows
    a = torch.cat([gate.sqrt()[:, None] * x for x, gate in zip(inputs, gates)])
    b = torch.cat([gate.sqrt()[:, None] * (x @ w.T) for x, gate, w in zip(inputs, gates, weights)])
    brute = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(merged, brute, rtol=1e-9, atol=1e-9)
    assert added == 0.0


def test_regmean_special_cases_and_damping():
    weights, inputs, _ = _members()
    gram = inputs[0].T @ inputs[0]
    one, _ = regmean_merge(weights[:1], gram[None], damping=0.0)
    torch.testing.assert_close(one, weights[0])
    mean, _ = regmean_merge(weights, gram.expand(3, -1, -1), damping=0.0)      # equal Grams: the plain mean
    torch.testing.assert_close(mean, weights.mean(0))
    grams = torch.stack([x.T @ x for x in inputs])
    damped, added = regmean_merge(weights, grams, damping=0.1)
    total = grams.sum(0)
    assert added == pytest.approx(0.1 * float(total.diagonal().mean()))
    expected = torch.einsum("noi,nij->oj", weights, grams) @ torch.linalg.inv(total + added * torch.eye(4,
                                                                              dtype=torch.float64))
    torch.testing.assert_close(damped, expected)


def test_regmean_handles_a_singular_gram_with_damping():
    weights, _, _ = _members(inp=6)
    x = torch.randn(2, 6, dtype=torch.float64)             # 2 tokens, 6 inputs: Σ G is rank 2
    merged, added = regmean_merge(weights, (x.T @ x).expand(3, -1, -1), damping=1e-3)
    assert torch.isfinite(merged).all() and added > 0


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0])                     # σ²: 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1 and energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2 and energy_rank(s, 0.99) == 3 and energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 1


def test_union_svd_merge_with_energy_truncates_like_the_rank():
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    s = torch.linalg.svdvals(weights.permute(1, 0, 2).reshape(6, 6))
    rank = energy_rank(s, 0.8)
    assert rank < 6
    torch.testing.assert_close(union_svd_merge(weights, w, energy=0.8), union_svd_merge(weights, w, rank))
    torch.testing.assert_close(union_svd_merge(weights, w, 2, energy=1.0), union_svd_merge(weights, w, 2))


def test_hierarchical_clusters_average_linkage():
    # 0,1 close; 2,3 close; 4 closer (on average) to {2,3} than to {0,1}
    s = torch.tensor([[1.0, 0.9, 0.1, 0.1, 0.2],
                      [0.9, 1.0, 0.1, 0.1, 0.2],
                      [0.1, 0.1, 1.0, 0.8, 0.5],
                      [0.1, 0.1, 0.8, 1.0, 0.3],
                      [0.2, 0.2, 0.5, 0.3, 1.0]], dtype=torch.float64)
    assert hierarchical_clusters(s, 2) == [[0, 1], [2, 3, 4]]
    assert hierarchical_clusters(s, 3) == [[0, 1], [2, 3], [4]]
    assert hierarchical_clusters(s, 5) == [[0], [1], [2], [3], [4]]
    with pytest.raises(ValueError):
        hierarchical_clusters(s, 0)


def test_regmean_ridge_pulls_unexcited_directions_to_the_prior():
    weights, _, _ = _members(inp=4)
    x = torch.zeros(5, 4, dtype=torch.float64)
    x[:, :2] = torch.randn(5, 2, dtype=torch.float64)            # inputs 2, 3 never excited
    grams = (x.T @ x).expand(3, -1, -1)
    prior = weights.mean(0)
    to_zero, _ = regmean_merge(weights, grams, 1e-3)
    to_prior, _ = regmean_merge(weights, grams, 1e-3, prior)
    torch.testing.assert_close(to_zero[:, 2:], torch.zeros(5, 2, dtype=torch.float64))
    torch.testing.assert_close(to_prior[:, 2:], prior[:, 2:])
    torch.testing.assert_close(to_prior[:, :2], to_zero[:, :2], rtol=1e-2, atol=1e-2)
