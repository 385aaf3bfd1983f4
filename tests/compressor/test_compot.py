"""compot: the orthonormal-dictionary variant of cospadi (closed-form code and dictionary steps)."""
from __future__ import annotations

import pytest
import torch

from lrcompress.compressor import GroupMember, get_compressor
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.modules import SparseDictLinear, dense_weight
from helpers import observed_linear, sparse_coded_linear


def compot(**options):
    cls = get_compressor("compot")
    return cls(cls.Config(**options))


def test_more_alternations_never_raise_the_output_error_and_the_dictionary_is_whitened_orthonormal():
    _, linear, gram = observed_linear(400, 64, 32, bias=True)
    errors = []
    for iterations in (1, 3, 8):
        result = compot(ratio=0.3, iterations=iterations, tolerance=0.0).compress("m", linear, {"gram": gram})
        assert isinstance(result.module, SparseDictLinear)
        assert "procrustes" in result.numerical_path
        errors.append(relative_output_error(dense_weight(linear).detach(), dense_weight(result.module).detach(),
                                            gram.gram("m")))
    assert errors[2] <= errors[1] + 1e-12 <= errors[0] + 2e-12
    # D = F⁻ᵀ·D_F with D_F orthonormal: Dᵀ·G·D = I in the damped metric the dictionary was learned in
    g = gram.gram("m")
    damped = g + 1e-4 * torch.diagonal(g).mean() * torch.eye(32, dtype=g.dtype)
    d = result.module.dictionary.detach()
    assert torch.allclose(d.T @ damped @ d, torch.eye(d.shape[1], dtype=d.dtype), atol=1e-8)


def _damped(gram: torch.Tensor) -> torch.Tensor:
    return gram + 1e-4 * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype)


def test_atoms_are_capped_at_the_input_width_and_the_plan_is_the_stored_bytes():
    _, linear, gram = observed_linear(300, 64, 16, bias=True)
    cospadi = get_compressor("cospadi")(get_compressor("cospadi").Config(ratio=0.05))
    assert cospadi.shape_for(16, 64, torch.float64, 1).atoms > 16             # ρ·s would exceed d_in
    compressor = compot(ratio=0.05, iterations=2)
    module = compressor.compress("m", linear, {"gram": gram}).module
    assert module.atoms == 16
    written = sum(t.numel() * t.element_size() for t in module.state_dict().values())   # from the tensors
    assert 0 <= compressor.plan(linear).params_after * 8 - written < 8     # indices counted in whole values


def test_group_mode_shares_one_dictionary_orthonormal_in_the_pooled_metric():
    """One dictionary for the group, learned on the stacked whitened weights with F from the pooled Gram:
    Dᵀ·(G₁ + G₂ + damping)·D = I."""
    members, grams = [], []
    for seed in (0, 1):
        _, linear, gram = observed_linear(300, 40, 24, seed=seed)
        members.append(GroupMember(f"layers.{seed}.m", linear, {"gram": gram}))
        grams.append(gram.gram("m"))
    results = compot(ratio=0.3, iterations=3, group_size=2).compress_group(members)
    assert results[0].module.dictionary is results[1].module.dictionary
    assert all(r.details["group_members"] == 2 for r in results)
    d = results[0].module.dictionary.detach()
    assert torch.allclose(d.T @ _damped(grams[0] + grams[1]) @ d, torch.eye(d.shape[1], dtype=d.dtype), atol=1e-8)


@pytest.mark.parametrize("seed, sparsity", [(0, 3), (1, 5), (2, 9)])
def test_at_an_allocated_sparsity_the_values_are_projections_on_an_orthonormal_dictionary(seed, sparsity):
    """``with_rank(s)`` (what a budget allocation uses) gives compot's closed form at that s: the whitened
    dictionary is orthonormal (Dᵀ·G·D = I, G the damped Gram), so the least-squares values on any support
    are the projections Dᵀ·G·w themselves, computed here directly (CoSpaDi's K-SVD dictionary is not
    orthonormal and its refit values are not projections)."""
    _, linear, gram = observed_linear(400, 48, 32, seed=seed)
    module = compot(ratio=0.3, iterations=4).with_rank(sparsity).compress("m", linear, {"gram": gram}).module
    assert module.sparsity == sparsity
    d, metric = module.dictionary.detach(), _damped(gram.gram("m"))
    assert torch.allclose(d.T @ metric @ d, torch.eye(d.shape[1], dtype=d.dtype), atol=1e-8)
    projections = d.T @ metric @ linear.weight.detach().T                               # k × d_out
    torch.testing.assert_close(module.values.detach(), projections.gather(0, module.indices.long()),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_on_sparse_coded_weights_it_beats_whitened_svd_at_equal_bytes(seed):
    """COMPOT's premise: whitened weights that are sparse codes over an orthonormal basis are fitted better
    by an orthonormal dictionary than by any low-rank factorization of the same size (k = 18 of the 32
    true atoms here)."""
    linear, gram = sparse_coded_linear(32, 96, atoms=32, sparsity=4, seed=seed, orthonormal=True)
    module = compot(ratio=0.5).compress("m", linear, {"gram": gram}).module
    rank = -(-module.storage_bytes() // (8 * (32 + 96)))
    baseline = get_compressor("whiten")(get_compressor("whiten").Config(rank=rank)).compress(
        "m", linear, {"gram": gram}).module
    w, g = dense_weight(linear).detach(), gram.gram("m")
    assert (relative_output_error(w, dense_weight(module).detach(), g)
            < relative_output_error(w, dense_weight(baseline).detach(), g))
