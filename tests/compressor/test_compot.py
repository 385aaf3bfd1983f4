"""compot: the orthonormal-dictionary variant of cospadi (closed-form code and dictionary steps)."""
from __future__ import annotations

import torch

from lrcompress.compressor import GroupMember, get_compressor
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.modules import SparseDictLinear, dense_weight
from helpers import observed_linear


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


def test_atoms_are_capped_at_the_input_width_and_plan_equals_the_record():
    _, linear, gram = observed_linear(300, 64, 16, bias=True)
    cospadi = get_compressor("cospadi")(get_compressor("cospadi").Config(ratio=0.05))
    assert cospadi.shape_for(16, 64, torch.float64, 1).atoms > 16             # ρ·s would exceed d_in
    compressor = compot(ratio=0.05, iterations=2)
    module = compressor.compress("m", linear, {"gram": gram}).module
    assert module.atoms == 16
    assert compressor.plan(linear).params_after == module.stored_params()


def test_group_mode_shares_one_orthonormal_dictionary():
    members = []
    for seed in (0, 1):
        _, linear, gram = observed_linear(300, 40, 24, seed=seed)
        members.append(GroupMember(f"layers.{seed}.m", linear, {"gram": gram}))
    results = compot(ratio=0.3, iterations=3, group_size=2).compress_group(members)
    assert results[0].module.dictionary is results[1].module.dictionary
    assert all(r.details["group_members"] == 2 for r in results)


def test_with_rank_keeps_the_method():
    assert type(compot(ratio=0.3).with_rank(3)).__name__ == "Compot"
