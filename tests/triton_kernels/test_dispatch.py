"""The kernel dispatch: the Triton kernel for CUDA tensors, the reference when forced, off CUDA, or where autograd must pass."""
from __future__ import annotations

import pytest
import torch

import lrcompress.triton_kernels.dispatch as dispatch
from lrcompress.triton_kernels import reference
from lrcompress.core.packing import pack_codes
from emulated_device import emulated_device

pytest.importorskip("triton")
from lrcompress.triton_kernels import quantized as kernel_module  # noqa: E402  (imports triton)


def operands():
    g = torch.Generator().manual_seed(0)
    qweight = pack_codes(torch.randint(0, 8, (5, 12), generator=g), 3)
    scales = torch.rand(5, 2, generator=g).to(torch.float16)
    zeros = torch.randint(0, 8, (5, 2), generator=g).to(torch.uint8)
    perm = torch.randperm(12, generator=g).to(torch.int64)
    return torch.randn(2, 12, generator=g), qweight, scales, zeros, perm


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_module, "quantized_matmul", lambda *args: calls.append(args) or "kernel")
    yield calls
    dispatch.triton_available.cache_clear()


def test_cuda_tensors_take_the_kernel_with_an_int32_perm(kernel_calls):
    x, qweight, scales, zeros, perm = operands()
    with emulated_device() as device:
        out = dispatch.quantized_matmul(*(t.to(device) for t in (x, qweight, scales, zeros)), 3, 8, perm.to(device))
    assert out == "kernel" and len(kernel_calls) == 1
    assert kernel_calls[0][6].dtype == torch.int32 and kernel_calls[0][4:6] == (3, 8)


def test_reference_when_forced_or_on_the_cpu(kernel_calls, monkeypatch):
    x, qweight, scales, zeros, perm = operands()
    cpu = dispatch.quantized_matmul(x, qweight, scales, zeros, 3, 8, perm)
    monkeypatch.setenv("LRCOMPRESS_KERNELS", "reference")
    dispatch.triton_available.cache_clear()
    with emulated_device() as device:
        forced = dispatch.quantized_matmul(*(t.to(device) for t in (x, qweight, scales, zeros)), 3, 8, perm.to(device))
    assert kernel_calls == [] and isinstance(cpu, torch.Tensor)
    torch.testing.assert_close(forced.local, cpu)



def test_the_sparse_dictionary_kernel_runs_only_where_no_gradient_must_pass(monkeypatch):
    """The Triton gather has no backward: a distillation that trains the dictionary or the values (autograd
    recording) gets the reference on CUDA too; inference (no_grad, or nothing requiring a gradient) keeps the
    kernel. Device eligibility is stubbed (the emulated device runs under no_grad)."""
    from lrcompress.triton_kernels import sparse_dict as sparse_kernel
    calls = []
    monkeypatch.setattr(sparse_kernel, "sparse_dict_matmul", lambda *args: calls.append(args) or "kernel")
    monkeypatch.setattr(dispatch, "use_triton", lambda *tensors: True)
    g = torch.Generator().manual_seed(0)
    z, indices, values = torch.randn(3, 6, generator=g), torch.randint(0, 6, (2, 4), generator=g), torch.randn(2, 4)
    assert dispatch.sparse_dict_matmul(z, indices, values) == "kernel"
    values.requires_grad_(True)
    with torch.no_grad():
        assert dispatch.sparse_dict_matmul(z, indices, values) == "kernel"
    trained = dispatch.sparse_dict_matmul(z, indices, values)
    assert len(calls) == 2 and trained.requires_grad
    torch.testing.assert_close(trained, reference.sparse_dict_matmul(z, indices, values))
