"""LowRankLinear's inference path: the factored product, or the dense product B·A where it is not larger."""
import pytest
import torch

from lrcompress.modules import LowRankLinear, prepare_for_inference


def _module(in_features, out_features, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LowRankLinear.from_factors(torch.randn(out_features, rank, generator=g),
                                      torch.randn(rank, in_features, generator=g),
                                      torch.randn(out_features, generator=g), torch.float32)


@pytest.mark.parametrize("rank,dense", [(4, False), (11, False), (12, True), (24, True)])
def test_dense_product_only_where_the_factors_are_not_smaller(rank, dense):
    module = _module(24, 24, rank)               # 24·24 = 576 values; factors 48·r: r ≥ 12 is not smaller
    x = torch.randn(3, 2, 24)
    with torch.no_grad():
        reference = x @ module.dense_weight().T + module.bias
        prepare_for_inference(module)
        assert module.dense_is_not_larger() is dense
        assert len(module.inference_tensors()) == int(dense)
        torch.testing.assert_close(module(x), reference, rtol=1e-5, atol=1e-4)


def test_gradients_reach_the_factors_after_prepare():
    module = _module(8, 8, 6)
    prepare_for_inference(module)
    module(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert module.down.weight.grad is not None and module.up.weight.grad is not None
