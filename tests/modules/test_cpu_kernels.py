"""The packed int4 CPU kernel path of QuantizedLinear against its dequantized reference.

Tolerance: the kernel takes bfloat16 activations (its only vectorized path), so the outputs differ
from the float32 reference by bfloat16 rounding: relative error (Frobenius) ≤ 1e-2, measured ≈ 3e-3.
"""
import pytest
import torch

from lrcompress.modules import QuantizedLinear, prepare_for_inference
from lrcompress.modules.cpu_kernels import PackedInt4Weight, kernel_group

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no packed int4 CPU kernel")


def _module(out_features, in_features, bits, group_size, act_order=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-in_features // group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=g)
    scales = (torch.rand(out_features, groups, generator=g) + 0.5) * 0.02
    zeros = torch.randint(0, 2**bits, (out_features, groups), generator=g)
    perm = torch.randperm(in_features, generator=g) if act_order else None
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantizedLinear.from_codes(codes, scales, zeros, bits, group_size, "float16", b, torch.float32, perm)


def _relative_error(module, x):
    with torch.no_grad():
        reference = module(x)
        prepare_for_inference(module)
        packed = module(x)
    return ((packed - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape,group_size", [((48, 128), 32), ((40, 200), 64), ((16, 192), 96), ((33, 300), 128)])
def test_packed_path_matches_the_reference(bits, shape, group_size):
    module = _module(*shape, bits, group_size)
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(1))
    assert _relative_error(module, x) <= 1e-2
    assert isinstance(module._inference, PackedInt4Weight)


def test_act_order_and_bias():
    module = _module(64, 256, 4, 64, act_order=True, bias=True)
    assert _relative_error(module, torch.randn(2, 256)) <= 1e-2


def test_eight_bit_offsets_stay_in_float32():
    """Zero points far from the middle (the offset (136 − z)·s is large) still match."""
    module = _module(32, 128, 8, 32)
    module.zeros.zero_()
    assert _relative_error(module, torch.randn(4, 128)) <= 1e-2


def test_group_sizes_without_a_kernel_use_the_weight_dequantized_once():
    assert kernel_group(16) is None and kernel_group(96) == 32
    module = _module(24, 64, 4, 16)
    x = torch.randn(2, 64)
    with torch.no_grad():
        reference = module(x)
        prepare_for_inference(module)
        assert isinstance(module._inference, torch.Tensor)
        torch.testing.assert_close(module(x), reference)   # same weight; summation order differs


def test_inputs_that_need_gradients_take_the_reference_path():
    module = _module(32, 64, 4, 32)
    prepare_for_inference(module)
    x = torch.randn(2, 64, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None


def test_prepared_state_is_not_written():
    module = _module(32, 64, 4, 32)
    before = set(module.state_dict())
    prepare_for_inference(module)
    assert set(module.state_dict()) == before


def test_kernel_group_avoids_padding_x_where_a_smaller_group_tiles_the_inputs():
    assert kernel_group(128, 576) == 64 and kernel_group(128, 512) == 128 and kernel_group(128, 600) == 128
    packed = _module(32, 576, 4, 128)
    prepare_for_inference(packed)
    assert packed._inference.group == 64 and packed._inference.padded_in == 576


def test_eight_bit_runs_one_kernel_call_over_both_planes():
    module = _module(32, 128, 8, 64)
    prepare_for_inference(module)
    layout = module._inference
    assert layout.two_planes and layout.scale_zero.shape == (2 * 128 // layout.group, 32, 2)
