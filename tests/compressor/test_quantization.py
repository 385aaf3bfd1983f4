"""rtn and gptq against independent computations: the grid, GPTQ's sequential (non-lazy) form,
GPTQ vs RTN on correlated inputs."""
import math

import pytest
import torch

from lrcompress.compressor import GramStatistic
from lrcompress.compressor.gptq import gptq_quantize
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.modules import QuantizedLinear, dense_weight
from helpers import compress_with, observed_linear

OUT, IN = 16, 40


def _layer(seed=0):
    return observed_linear(400, OUT, IN, seed, bias=True)


def _run(method, linear, gram, **options):
    return compress_with(method, linear, {"gram": gram}, **options)


def _reference_grid(group, bits):
    """Round-to-nearest on [min(w,0), max(w,0)] written out per row, scale rounded to float16."""
    maxq = 2**bits - 1
    low, high = min(group.min().item(), 0.0), max(group.max().item(), 0.0)
    if low == high:
        low, high = -1.0, 1.0
    scale = float(torch.tensor((high - low) / maxq).to(torch.float16))
    zero = min(max(round(-low / scale), 0), maxq)
    return scale, zero


@pytest.mark.parametrize("bits,group", [(3, 16), (4, None), (8, 128)])
def test_rtn_matches_a_row_by_row_reference(bits, group):
    _, linear, gram = _layer()
    module = _run("rtn", linear, gram, bits=bits, group_size=group)
    assert isinstance(module, QuantizedLinear)
    width = min(group or IN, IN)
    w = linear.weight.detach()
    expected = torch.empty_like(w)
    for i in range(OUT):
        for start in range(0, IN, width):
            chunk = w[i, start:start + width]
            scale, zero = _reference_grid(chunk, bits)
            q = torch.clamp(torch.round(chunk / scale) + zero, 0, 2**bits - 1)
            expected[i, start:start + width] = (q - zero) * scale
    torch.testing.assert_close(dense_weight(module).double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(module.bias.double(), linear.bias.detach(), rtol=0, atol=1e-6)


def _sequential_gptq(weight, gram, bits, width, damping):
    """GPTQ in its plain form (paper eq. 2-4): quantize column j, spread the error with the current
    inverse Hessian, then remove j from it by Gaussian elimination. No Cholesky, no blocks."""
    w = weight.clone()
    h = gram + damping * torch.diagonal(gram).mean() * torch.eye(IN, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.empty(OUT, IN, dtype=torch.int64)
    for j in range(IN):
        if j % width == 0:
            grid = [_reference_grid(w[i, j:j + width], bits) for i in range(OUT)]
            scale = torch.tensor([g[0] for g in grid], dtype=torch.float64)
            zero = torch.tensor([g[1] for g in grid], dtype=torch.float64)
        q = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, 2**bits - 1)
        codes[:, j] = q.long()
        err = (w[:, j] - (q - zero) * scale) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
def test_gptq_lazy_blocks_equal_the_sequential_algorithm(block_size):
    """Groups of 12 that straddle blocks of 7 or 16: the result must not depend on the block size."""
    _, linear, gram = _layer(seed=1)
    weight, g = linear.weight.detach(), gram.gram("m")
    result = gptq_quantize(weight, g, 3, 12, "float16", damping=0.01, block_size=block_size)
    reference = _sequential_gptq(weight, g, 3, 12, 0.01)
    agree = (result.codes == reference).double().mean().item()
    assert agree > 0.995  # a rare x.5 tie may round differently after ~1e-15 of float noise


def test_gptq_with_an_isotropic_gram_is_round_to_nearest():
    """H ∝ I: no error feedback between columns, so GPTQ's codes are RTN's."""
    _, linear, _ = _layer()
    identity = GramStatistic(IN)
    identity.sum_xx = torch.eye(IN, dtype=torch.float64) * 7.0
    gptq = _run("gptq", linear, identity, bits=4, group_size=8)
    rtn = _run("rtn", linear, identity, bits=4, group_size=8)
    assert torch.equal(gptq.codes(), rtn.codes())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_4bit_beats_rtn_4bit_on_correlated_inputs(act_order):
    errors = {"gptq": [], "rtn": []}
    for seed in range(3):
        _, linear, gram = _layer(seed)
        for method, options in (("gptq", {"act_order": act_order}), ("rtn", {})):
            module = _run(method, linear, gram, bits=4, group_size=16, **options)
            errors[method].append(relative_output_error(linear.weight, dense_weight(module), gram.gram("m")))
    for gptq, rtn in zip(errors["gptq"], errors["rtn"]):
        assert gptq < 0.8 * rtn


def test_gptq_act_order_stores_a_permutation_that_reproduces_its_weight():
    x, linear, gram = _layer(seed=2)
    module = _run("gptq", linear, gram, bits=3, group_size=8, act_order=True)
    assert module.perm is not None
    expected_order = torch.argsort(torch.diagonal(gram.gram("m")), descending=True)
    assert torch.equal(module.perm.long(), expected_order)
    stored = module.codes()
    width, perm = module.group_size, module.perm.long()
    scales, zeros = module.scale_values().double(), module.zeros.double()
    for k in range(IN):  # column k of the stored codes is input perm[k], in group k // width
        expected = (stored[:, k] - zeros[:, k // width]) * scales[:, k // width]
        torch.testing.assert_close(dense_weight(module)[:, perm[k]].double(), expected, rtol=0, atol=1e-7)
    y = module(x.float())
    torch.testing.assert_close(y.double(), x @ dense_weight(module).double().T + linear.bias.detach(),
                               rtol=1e-5, atol=1e-5)


def test_gptq_handles_dead_inputs():
    _, linear, gram = _layer()
    gram.sum_xx[:, 3] = 0
    gram.sum_xx[3, :] = 0
    module = _run("gptq", linear, gram, bits=4, group_size=8)
    assert torch.isfinite(dense_weight(module)).all()
    assert float(dense_weight(module)[:, 3].abs().max()) <= module.scale_values().float().max() / 2 + 1e-6


def test_quantized_bytes_are_what_the_format_says():
    _, linear, gram = _layer()
    module = _run("rtn", linear, gram, bits=3, group_size=16)
    groups = math.ceil(IN / 16)
    # codes 3 bits packed, float16 scale + uint8 zero per group, float64 bias (the layer is float64)
    assert module.storage_bytes() == math.ceil(OUT * IN / 8) * 3 + OUT * groups * 3 + OUT * 8
