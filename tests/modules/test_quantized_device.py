"""QuantizedLinear on a CUDA device: the forward multiplies from the packed codes through the kernel
dispatch and never builds the dense weight. The device is emulated (``tests/emulated_device.py``), so
the dispatch itself is replaced: by a spy here, by the torch reference where it must compute."""
from __future__ import annotations

import math

import pytest
import torch

import lrcompress.triton_kernels as triton_kernels
import lrcompress.triton_kernels.dispatch as dispatch
from lrcompress.modules import QuantizedLinear, prepare_for_inference
from emulated_device import Remote, emulated_device


def quantized(bits: int = 3, group: int = 8, act_order: bool = True, bias: bool = True,
              shape: tuple[int, int] = (6, 20)) -> QuantizedLinear:
    out_features, in_features = shape
    g = torch.Generator().manual_seed(bits * 100 + group)
    groups = math.ceil(in_features / group)
    codes = torch.randint(0, 2**bits, shape, generator=g)
    scales = torch.rand(out_features, groups, generator=g).to(torch.float16).double() + 0.01
    zeros = torch.randint(0, 2**bits, (out_features, groups), generator=g).double()
    perm = torch.randperm(in_features, generator=g) if act_order else None
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantizedLinear.from_codes(codes, scales, zeros, bits, group, "float16", b, torch.float32, perm)


@pytest.fixture
def spy(monkeypatch):
    """Record each call of the dispatch and answer with the torch reference."""
    calls = []

    def record(*args):
        calls.append(args)
        return triton_kernels.reference.quantized_matmul(*args)

    monkeypatch.setattr(triton_kernels, "quantized_matmul", record)
    return calls


def no_dense_weight(*args):
    raise AssertionError("the device forward built the dense weight")


def test_a_cuda_forward_goes_through_the_dispatch_with_operands_prepared_once(spy):
    module = quantized()
    x = torch.randn(2, 3, module.in_features)
    expected = module(x)                                            # CPU: the dequantized reference
    with emulated_device() as device:
        module.to(device)
        prepare_for_inference(module)
        module.dense_weight = no_dense_weight
        y1, _ = module(x.to(device)), module(x.to(device))
    assert len(spy) == 2 and isinstance(y1, Remote) and y1.shape == (2, 3, module.out_features)
    torch.testing.assert_close(y1.local, expected)
    first, second = spy
    assert all(a is b for a, b in zip(first[1:], second[1:]))     # the same tensors: nothing rebuilt per call
    qweight, scales, zeros, bits, group, perm, bias = first[1:]
    assert qweight is module.qweight and zeros is module.zeros and bias is module.bias
    assert scales.dtype == torch.float16 and perm.dtype == torch.int32 and (bits, group) == (3, 8)
    assert module.inference_tensors() == []                         # views of the buffers: no extra memory


def test_operands_follow_a_replaced_buffer_and_an_unprepared_module_works(spy):
    module = quantized(act_order=False, bias=False)
    x = torch.randn(4, module.in_features)
    expected = module(x)
    with emulated_device() as device:
        module.to(device)
        module(x.to(device))                                        # never prepared
        prepare_for_inference(module)
        module.qweight = module.qweight.clone()                     # as loading or moving replaces a buffer
        y = module(x.to(device))
    assert spy[0][6] is None and spy[0][7] is None                  # no perm, no bias
    assert spy[1][1] is module.qweight
    torch.testing.assert_close(y.local, expected)


@pytest.mark.parametrize("bits, group, shape", [(2, 16, (7, 40)), (4, 32, (9, 48)), (8, 12, (5, 30)),
                                                (5, 7, (3, 29))])
def test_device_reference_path_computes_what_the_cpu_forward_does(monkeypatch, bits, group, shape):
    """Through the real dispatch (the kernel kept out: the tensors only say CUDA) on every width."""
    monkeypatch.setattr(dispatch, "use_triton", lambda *tensors: False)
    module = quantized(bits, group, shape=shape)
    x = torch.randn(3, shape[1])
    expected = module(x)
    with emulated_device() as device:
        module.to(device)
        module.dense_weight = no_dense_weight
        y = module(x.to(device))
    torch.testing.assert_close(y.local, expected)


def test_cpu_forward_does_not_use_the_dispatch(spy):
    module = quantized()
    x = torch.randn(2, module.in_features)
    module(x)
    prepare_for_inference(module)
    module(x)
    assert spy == []
