"""Quantized, sparse and compensated linears: exact storage round trips through safetensors and
from_spec, forward = x·Wᵀ + b with W rebuilt independently, exact byte counts."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lrcompress.modules import (CompensatedLinear, LowRankLinear, MaskedSparseLinear, NMSparseLinear,
                                QuantizedLinear, dense_weight, module_from_spec, module_spec, storage_bytes)

OUT, IN = 6, 20


def _roundtrip(module, tmp_path, dtype=torch.float32):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    rebuilt = module_from_spec(module_spec(module), dtype)
    rebuilt.load_state_dict(load_file(path), strict=True)
    return rebuilt, path.stat().st_size


def _quantized(act_order=False, bias=True, group=8, bits=3):
    g = torch.Generator().manual_seed(1)
    groups = math.ceil(IN / group)
    codes = torch.randint(0, 2**bits, (OUT, IN), generator=g)
    scales = torch.rand(OUT, groups, generator=g, dtype=torch.float64).to(torch.float16).double() + 0.01
    zeros = torch.randint(0, 2**bits, (OUT, groups), generator=g).double()
    perm = torch.randperm(IN, generator=g) if act_order else None
    b = torch.randn(OUT, generator=g) if bias else None
    return QuantizedLinear.from_codes(codes, scales.to(torch.float16).double(), zeros, bits, group, "float16",
                                      b, torch.float32, perm), codes, scales, zeros, perm, b


@pytest.mark.parametrize("act_order", [False, True])
def test_quantized_linear_dequantizes_and_round_trips(tmp_path, act_order):
    module, codes, scales, zeros, perm, bias = _quantized(act_order)
    # independent dequantization, group by group (last group of 20 = 8 + 8 + 4 is ragged)
    expected_stored = torch.empty(OUT, IN, dtype=torch.float64)
    for j in range(IN):
        expected_stored[:, j] = (codes[:, j] - zeros[:, j // 8]) * scales[:, j // 8].to(torch.float16).double()
    expected = torch.empty_like(expected_stored)
    if act_order:
        for k in range(IN):
            expected[:, perm[k]] = expected_stored[:, k]
    else:
        expected = expected_stored
    assert torch.equal(module.dense_weight().double(), expected)
    x = torch.randn(5, IN)
    torch.testing.assert_close(module(x), x @ expected.float().T + bias)
    rebuilt, _ = _roundtrip(module, tmp_path)
    assert torch.equal(rebuilt.codes(), codes) and torch.equal(rebuilt.dense_weight(), module.dense_weight())


def test_quantized_storage_is_exact_and_survives_dtype_casts():
    module, *_ = _quantized(bias=True)
    groups = math.ceil(IN / 8)
    expected = math.ceil(OUT * IN / 8) * 3 + OUT * groups * (2 + 1) + OUT * 4
    assert storage_bytes(module) == expected
    before = module.dense_weight().clone()
    module.to(torch.float64)  # casts floating tensors: the raw-bits scales must not change
    assert storage_bytes(module) == expected + OUT * 4  # only the bias doubled
    assert torch.equal(module.dense_weight().float(), before)
    assert module.stored_params() == OUT * IN + OUT


def test_masked_sparse_linear(tmp_path):
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    keep = torch.rand(OUT, IN, generator=g) < 0.3
    module = MaskedSparseLinear.from_dense(weight, keep, bias, torch.float32)
    assert torch.equal(module.dense_weight(), torch.where(keep, weight, torch.zeros_like(weight)))
    x = torch.randn(4, IN)
    torch.testing.assert_close(module(x), x @ (weight * keep).T + bias)
    nnz = int(keep.sum())
    assert module.stored_params() == nnz + OUT
    assert storage_bytes(module) == 4 * nnz + math.ceil(OUT * IN / 8) + 4 * OUT
    rebuilt, _ = _roundtrip(module, tmp_path)
    assert torch.equal(rebuilt.dense_weight(), module.dense_weight())


def test_nm_sparse_linear(tmp_path):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(OUT, IN, generator=g)
    # keep positions 1 and 3 of every group of 4
    keep = torch.tensor([False, True, False, True]).repeat(OUT, IN // 4)
    module = NMSparseLinear.from_dense(weight, keep, 2, 4, None, torch.float32)
    assert torch.equal(module.dense_weight(), weight * keep)
    assert torch.equal(module.positions(), torch.tensor([1, 3]).expand(OUT, IN // 4, 2))
    assert storage_bytes(module) == 4 * (OUT * IN // 2) + math.ceil(OUT * IN // 2 / 8) * 2
    rebuilt, _ = _roundtrip(module, tmp_path)
    assert torch.equal(rebuilt.dense_weight(), module.dense_weight())
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        NMSparseLinear.from_dense(weight, torch.ones_like(keep), 2, 4, None, torch.float32)


@pytest.mark.parametrize("base_kind", ["linear", "quantized", "low_rank"])
def test_compensated_linear_nests_any_base(tmp_path, base_kind):
    torch.manual_seed(4)
    if base_kind == "linear":
        base = nn.Linear(IN, OUT)
    elif base_kind == "quantized":
        base = _quantized()[0]
    else:
        base = LowRankLinear.from_factors(torch.randn(OUT, 3), torch.randn(3, IN), torch.randn(OUT), torch.float32)
    down, up = nn.Linear(IN, 2, bias=False), _quantized(bias=False, group=2, bits=4)[0].__class__.from_codes(
        torch.randint(0, 16, (OUT, 2)), torch.full((OUT, 1), 0.125, dtype=torch.float64),
        torch.full((OUT, 1), 8.0, dtype=torch.float64), 4, 2, "float16", None, torch.float32)
    module = CompensatedLinear(base, down, up)
    expected = dense_weight(base) + dense_weight(up) @ down.weight
    torch.testing.assert_close(module.dense_weight(), expected)
    x = torch.randn(3, IN)
    torch.testing.assert_close(module(x), base(x) + (x @ down.weight.T) @ dense_weight(up).T)
    assert module.storage_bytes() == storage_bytes(base) + storage_bytes(down) + storage_bytes(up)
    rebuilt, size = _roundtrip(module, tmp_path)
    assert type(rebuilt.base) is type(base)
    torch.testing.assert_close(rebuilt(x), module(x), rtol=0, atol=0)
