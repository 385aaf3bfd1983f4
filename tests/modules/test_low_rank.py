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


def test_factors_are_stored_column_major_with_unchanged_values(tmp_path):
    from safetensors.torch import load_file, save_file

    module = _module(40, 24, 6)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    prepare_for_inference(module)
    assert module.down.weight.t().is_contiguous() and module.up.weight.t().is_contiguous()
    assert module.down.weight.shape == (6, 40)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp_path / "m.safetensors")
    for key, tensor in load_file(tmp_path / "m.safetensors").items():
        torch.testing.assert_close(tensor, before[key], rtol=0, atol=0)
