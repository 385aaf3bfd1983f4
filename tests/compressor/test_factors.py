"""Quantized factors (``apply_to: factors``): per-factor GPTQ Hessians, per-column value Hessians, exact bytes."""
from __future__ import annotations

import pytest
import torch

from helpers import compress_with, observed_linear
from lrcompress.compressor.factors import low_rank_bytes, value_grams
from lrcompress.compressor.gptq import gptq_quantize, gptq_rows
from lrcompress.errors import LrcompressError
from lrcompress.modules import LowRankLinear, QuantizedLinear, SparseDictLinear, dense_weight, storage_bytes


def _error(module, x, reference) -> float:
    with torch.no_grad():
        return float((module(x) - reference(x)).norm() / reference(x).norm())


@pytest.fixture(scope="module")
def low_rank():
    x, linear, gram = observed_linear(1500, 96, 80, seed=1)
    return x, linear, {"gram": gram}, compress_with("whiten", linear, {"gram": gram}, rank=24)


@pytest.fixture(scope="module")
def dictionary():
    x, linear, gram = observed_linear(1500, 72, 64, seed=2)
    stats = {"gram": gram}
    return x, linear, stats, compress_with("cospadi", linear, stats, ratio=0.3, iterations=2)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_on_the_factors_beats_rtn_on_the_factors(low_rank, bits):
    x, linear, stats, module = low_rank
    options = dict(bits=bits, group_size=16, apply_to="factors")
    rtn, gptq = compress_with("rtn", module, stats, **options), compress_with("gptq", module, stats, **options)
    assert isinstance(gptq, LowRankLinear) and isinstance(gptq.down, QuantizedLinear) and isinstance(gptq.up, QuantizedLinear)
    assert _error(gptq, x, linear) < 0.97 * _error(rtn, x, linear)
    assert _error(gptq, x, module) < 0.9 * _error(rtn, x, module)


def test_each_factor_gets_the_hessian_of_its_own_inputs(low_rank):
    """Down: GPTQ with XᵀX; up: GPTQ with ZᵀZ, Z the outputs of the *quantized* down factor on the calibration
    inputs — computed here from the data, independently of the compressor's A_q·G·A_qᵀ."""
    x, _, stats, module = low_rank
    quantized = compress_with("gptq", module, stats, bits=3, group_size=16, apply_to="factors")
    down = gptq_quantize(module.down.weight.detach(), x.T @ x, 3, 16, "float16")
    assert torch.equal(quantized.down.codes(), down.codes)
    with torch.no_grad():
        z = quantized.down(x)                                      # rank-r activations of the quantized factor
    up = gptq_quantize(module.up.weight.detach(), z.T @ z, 3, 16, "float16")
    assert torch.equal(quantized.up.codes(), up.codes)
    z_float = x @ module.down.weight.detach().T                       # the unquantized factor's activations
    wrong = gptq_quantize(module.up.weight.detach(), z_float.T @ z_float,
                          3, 16, "float16")
    assert not torch.equal(quantized.up.codes(), wrong.codes)


def test_rows_with_one_shared_hessian_are_plain_gptq():
    torch.manual_seed(0)
    weight = torch.randn(40, 24, dtype=torch.float64)
    basis = torch.randn(200, 24, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    hessian = basis.T @ basis
    shared = gptq_quantize(weight, hessian, 3, 8, "float16", block_size=7)
    rows = gptq_rows(weight, lambda part: hessian.expand(part.stop - part.start, 24, 24), 3, 8, "float16", chunk=16)
    assert torch.equal(rows.codes, shared.codes) and torch.equal(rows.scales, shared.scales)
    assert rows.loss == pytest.approx(shared.loss, rel=1e-9)


def test_value_hessians_are_the_blocks_of_the_dictionary_outputs_gram(dictionary):
    x, _, _, module = dictionary
    z = x @ module.dictionary.detach()                             # dictionary outputs on the calibration inputs
    grams = value_grams(module.dictionary, module.indices, x.T @ x)(slice(3, 9))
    for j, block in zip(range(3, 9), grams):
        support = module.indices[:, j].long()
        torch.testing.assert_close(block, z[:, support].T @ z[:, support], rtol=1e-10, atol=1e-8)


def test_gptq_on_the_dictionary_and_values_beats_rtn(dictionary):
    x, linear, stats, module = dictionary
    options = dict(bits=3, group_size=16, apply_to="factors")
    rtn, gptq = compress_with("rtn", module, stats, **options), compress_with("gptq", module, stats, **options)
    assert isinstance(gptq, SparseDictLinear) and gptq.values is None and gptq.dictionary is None
    assert isinstance(gptq.quantized_dictionary, QuantizedLinear) and torch.equal(gptq.indices, module.indices)
    assert _error(gptq, x, module) < 0.9 * _error(rtn, x, module)
    torch.testing.assert_close(gptq.dense_weight(), (gptq.dictionary_matrix() @ gptq.coefficients()).T)


def test_the_values_hessians_come_from_the_quantized_dictionary(dictionary):
    """Values: per column, GPTQ with the Gram of z = x·D_q on its support, D_q the *quantized* dictionary —
    recomputed here from the data. On their own, GPTQ gains little over rtn on values: OMP picks nearly
    orthogonal atoms in the whitened metric, so each column's Hessian is close to diagonal."""
    x, _, stats, module = dictionary
    gptq = compress_with("gptq", module, stats, bits=3, group_size=16, apply_to="factors")
    with torch.no_grad():
        z = gptq.quantized_dictionary(x)                            # outputs of the quantized dictionary

    def from_data(columns: slice) -> torch.Tensor:
        support = module.indices[:, columns].T.long()
        picked = z[:, support]                                      # tokens × columns × s
        return torch.einsum("tcs,tcu->csu", picked, picked)
    values = gptq_rows(module.values.detach().T, from_data, 3, 16, "float16")
    assert torch.equal(gptq.quantized_values.codes(), values.codes)


def test_a_shared_dictionary_stays_shared_and_only_the_values_are_quantized():
    from lrcompress.compressor import GroupMember, get_compressor
    members = []
    for seed in (3, 4):
        _, linear, gram = observed_linear(600, 40, 32, seed=seed)
        members.append(GroupMember(f"m{seed}", linear, {"gram": gram}))
    cls = get_compressor("cospadi")
    shared = [r.module for r in cls(cls.Config(ratio=0.3, group_size=2, iterations=1)).compress_group(members)]
    packed = [compress_with("rtn", m, {}, bits=4, group_size=8, apply_to="factors") for m in shared]
    assert packed[0].dictionary is packed[1].dictionary is shared[0].dictionary
    assert all(isinstance(m.quantized_values, QuantizedLinear) and m.values is None for m in packed)


def test_stored_bytes_are_the_state_dict_and_the_budget_price(low_rank):
    _, linear, stats, module = low_rank
    for bits in (None, 4, 3):
        stored = module if bits is None else compress_with("rtn", module, stats, bits=bits, group_size=16,
                                                           apply_to="factors")
        counted = sum(t.numel() * t.element_size() for t in stored.state_dict().values())
        assert storage_bytes(stored) == counted == low_rank_bytes(linear, 24, bits, 16)
    assert low_rank_bytes(linear, 24, 4, 16) < low_rank_bytes(linear, 24, 8, 16) < low_rank_bytes(linear, 24)


def test_wrong_combinations_fail_naming_the_module(low_rank, dictionary):
    _, linear, stats, module = low_rank
    with pytest.raises(LrcompressError, match="layers.0.q_proj: gptq with apply_to: factors .* low-rank.* is Linear"):
        compress_with("gptq", linear, stats, name="layers.0.q_proj", apply_to="factors")
    once = compress_with("rtn", module, stats, apply_to="factors")
    with pytest.raises(LrcompressError, match="already quantized"):
        compress_with("gptq", once, stats, apply_to="factors")
    with pytest.raises(LrcompressError, match="act_order"):
        compress_with("gptq", dictionary[3], dictionary[2], apply_to="factors", act_order=True)
    product = compress_with("rtn", module, stats, group_size=16)                  # apply_to: weight (default)
    assert isinstance(product, QuantizedLinear) and product.out_features * product.in_features == 96 * 80
    torch.testing.assert_close(dense_weight(product), dense_weight(module), atol=0.1, rtol=0)
