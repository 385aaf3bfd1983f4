"""RegMean, the energy rule and hierarchical clustering against closed forms and brute force."""
import pytest
import torch

from lrcompress.compressor.expert_merge import (energy_rank, hierarchical_clusters, regmean_merge,
                                                union_svd_merge)


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
