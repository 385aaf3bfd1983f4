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
