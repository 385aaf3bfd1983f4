"""SparseDictLinear: forward against the definition, fixed-nnz layout on disk, spec round trip."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrcompress.modules import SparseDictLinear
from lrcompress.modules.sparse_dict import dictionary_shares


def random_module(in_features=13, out_features=11, atoms=9, sparsity=3, bias=True, seed=0,
                  dtype=torch.float32) -> SparseDictLinear:
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(in_features, atoms, generator=g)
    indices = torch.stack([torch.randperm(atoms, generator=g)[:sparsity] for _ in range(out_features)], dim=1)
    values = torch.randn(sparsity, out_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    return SparseDictLinear.from_code(dictionary, indices, values, b, dtype)


def test_forward_is_the_gather_definition_and_the_dense_weight():
    module = random_module()
    x = torch.randn(2, 5, 13)
    z = x @ module.dictionary
    expected = torch.zeros(2, 5, 11)
    for j in range(11):                                       # y[:, j] = Σ_t z[:, idx[t, j]]·val[t, j]
        for t in range(3):
            expected[..., j] += z[..., int(module.indices[t, j])] * module.values[t, j]
    expected += module.bias
    with torch.no_grad():
        assert torch.allclose(module(x), expected, atol=1e-5)
        assert torch.allclose(module(x), x @ module.dense_weight().T + module.bias, atol=1e-5)


def test_index_dtype_is_int16_below_32768_atoms_and_int32_from_there():
    assert random_module(in_features=2, atoms=32767, out_features=3).indices.dtype == torch.int16
    assert random_module(in_features=2, atoms=32768, out_features=3).indices.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_accounting_matches_the_bytes_on_disk(tmp_path, dtype):
    module = random_module(in_features=40, out_features=37, atoms=20, sparsity=5, dtype=dtype)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    tensors = load_file(path)
    assert "indices" not in tensors                                # the unpacked form is not stored
    index_bytes = tensors["packed_indices"].numel()
    assert tensors["packed_indices"].dtype == torch.uint8 and index_bytes == math.ceil(5 * 37 / 8) * 5  # 20 atoms: 5 bits
    assert tensors["values"].dtype == dtype and tuple(tensors["values"].shape) == (5, 37)
    value_bytes = torch.finfo(dtype).bits // 8
    assert module.index_params() == math.ceil(index_bytes / value_bytes)
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert module.stored_params() * value_bytes - stored_bytes in range(0, value_bytes)


def test_spec_round_trip_rebuilds_an_identical_module():
    module = random_module()
    rebuilt = SparseDictLinear.from_spec(module.spec(), torch.float32)
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(4, 13)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))
    assert rebuilt.spec() == module.spec()


@pytest.mark.parametrize("atoms", [2, 9, 256, 257, 1000, 40000])
def test_indices_survive_packing_at_ceil_log2_k_bits(atoms):
    module = random_module(in_features=3, out_features=29, atoms=atoms, sparsity=2)
    bits = max(1, math.ceil(math.log2(atoms)))
    assert module.spec()["index_bits"] == bits
    assert module.packed_indices.numel() == (58 if bits == 8 else math.ceil(58 / 8) * bits)   # bytes need no padding
    rebuilt = SparseDictLinear.from_spec(module.spec(), torch.float32)
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt.indices, module.indices) and rebuilt.indices.dtype == module.indices.dtype


def test_a_checkpoint_of_the_unpacked_layout_still_loads():
    module = random_module()
    legacy = {k: v for k, v in module.state_dict().items() if k != "packed_indices"}
    legacy["indices"] = module.indices.clone()                   # int16 [s, out], as written before packing
    spec = {k: v for k, v in module.spec().items() if k != "index_bits"} | {"index_dtype": "int16"}
    rebuilt = SparseDictLinear.from_spec(spec, torch.float32)
    rebuilt.load_state_dict(legacy, strict=True)
    assert torch.equal(rebuilt.indices, module.indices) and torch.equal(rebuilt.packed_indices, module.packed_indices)


def test_dictionary_shares_add_up_and_are_even():
    shares = dictionary_shares(7, 5, 3)
    assert sum(shares) == 35 and max(shares) - min(shares) <= 1


def test_inference_layout_is_built_once_and_computes_the_same():
    """prepare_inference builds S densely once (not per call, not in the state dict); same outputs."""
    from lrcompress.modules import prepare_for_inference

    module = random_module()
    x = torch.randn(2, 5, 13)
    keys = set(module.state_dict())
    with torch.no_grad():
        reference = module(x)
        prepare_for_inference(module)
        assert module.inference_tensors()[0].shape == (9, 11)
        torch.testing.assert_close(module(x), reference, rtol=1e-5, atol=1e-5)
    assert set(module.state_dict()) == keys
    x.requires_grad_(True)                       # training takes the reference path on the live values
    module(x).sum().backward()
    assert module.values.grad is not None


def test_gradients_reach_the_dictionary_and_values_and_match_finite_differences():
    """What a distillation trains (pipeline.refine's ``factors``): autograd through the forward against central
    differences in float64, for the input, the dictionary and the values on their support."""
    module = random_module(in_features=5, out_features=4, atoms=6, sparsity=2, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    dictionary = module.dictionary.detach().clone().requires_grad_(True)
    values = module.values.detach().clone().requires_grad_(True)
    def through_module(x, dictionary, values):
        return torch.func.functional_call(module, {"dictionary": dictionary, "values": values}, (x,), strict=False)

    assert torch.autograd.gradcheck(through_module, (x, dictionary, values))
    module.dictionary.requires_grad_(True)
    module.values.requires_grad_(True)
    loss = module(x).pow(2).sum()
    loss.backward()
    expected = torch.autograd.grad(((x @ module.dictionary) @ _dense_code(module.indices, module.values, 6)
                                    + module.bias).pow(2).sum(), (module.dictionary, module.values))
    assert torch.allclose(module.dictionary.grad, expected[0]) and torch.allclose(module.values.grad, expected[1])
    assert module.values.grad.abs().sum() > 0


def _dense_code(indices: torch.Tensor, values: torch.Tensor, atoms: int) -> torch.Tensor:
    """S (atoms × out) from the fixed-nnz code by a one-hot product, independent of the module's scatter."""
    one_hot = torch.nn.functional.one_hot(indices.long(), atoms).to(values.dtype)      # [s, out, atoms]
    return torch.einsum("soa,so->ao", one_hot, values)


def test_a_released_inference_cache_lets_trained_values_show_in_the_forward():
    """prepare_inference caches S densely on the CPU; release_inference drops it, so a changed value is seen."""
    module = random_module()
    module.prepare_inference()
    assert module.inference_tensors()
    x = torch.randn(4, 13)
    with torch.no_grad():
        before = module(x)
        module.values.add_(1.0)
        assert torch.equal(module(x), before)             # the stale cache: why a trainer must release it
        module.release_inference()
        assert not module.inference_tensors()
        assert torch.allclose(module(x), x @ module.dense_weight().T + module.bias, atol=1e-5)


def test_balancing_the_atoms_keeps_the_product_and_equalizes_the_norms():
    module = random_module(atoms=9, sparsity=3)
    with torch.no_grad():
        module.dictionary.mul_(1e-3)                     # the pursuit's scale: small atoms, large values
        module.values.mul_(1e3)
    weight = module.dense_weight().clone()
    assert module.balance_atoms()
    torch.testing.assert_close(module.dense_weight(), weight, rtol=1e-5, atol=1e-5)
    rows = torch.zeros(9).index_add_(0, module.indices.long().flatten(), module.values.detach().pow(2).flatten())
    used = rows > 0
    torch.testing.assert_close(module.dictionary.detach().pow(2).sum(0)[used], rows[used])
