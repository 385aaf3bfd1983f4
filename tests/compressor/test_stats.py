import torch

from lrcompress.compressor import GramStatistic
from lrcompress.errors import NumericalError

import pytest


def test_gram_merge_equals_one_pass():
    x = torch.randn(3, 7, 5)
    whole, first, second = GramStatistic(5), GramStatistic(5), GramStatistic(5)
    whole.observe(x, x)
    first.observe(x[:2], x)
    second.observe(x[2:], x)
    first.merge(second)
    torch.testing.assert_close(first.sum_xx, whole.sum_xx)
    torch.testing.assert_close(first.mean(), whole.mean())
    assert first.count == whole.count == 21
    flat = x.reshape(-1, 5).double()
    torch.testing.assert_close(whole.gram("m"), flat.T @ flat)


def test_nan_gram_names_the_module():
    stat = GramStatistic(3)
    stat.observe(torch.tensor([[1.0, float("nan"), 0.0]]), None)
    with pytest.raises(NumericalError, match="model.layers.4.mlp.up_proj"):
        stat.gram("model.layers.4.mlp.up_proj")


def test_grams_sharing_an_input_compute_its_product_once_and_stay_bit_identical(monkeypatch):
    from lrcompress.compressor.stats import share_products

    x, other = torch.randn(2, 9, 6), torch.randn(2, 9, 6)
    alone, q, k = GramStatistic(6), GramStatistic(6), GramStatistic(6)
    shared = share_products([q, k])
    products = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(1) or real_matmul(a, b))
    for batch in (x, other):
        alone.observe(batch, None)
        q.observe(batch.detach(), None)        # a hook sees a new tensor object on the same storage
        k.observe(batch.detach(), None)
    assert len(products) == 4                  # alone twice, q/k once per batch
    for stat in (q, k):
        assert torch.equal(stat.sum_xx, alone.sum_xx) and torch.equal(stat.sum_x, alone.sum_x)
        assert stat.count == alone.count == 36
    x.add_(1.0)                                # changed in place: the version counter forbids a stale product
    q.observe(x, None)
    k.observe(x, None)
    assert len(products) == 5
    flat = x.reshape(-1, 6).double()
    torch.testing.assert_close(k.sum_xx - alone.sum_xx, flat.T @ flat)
    shared.clear()
