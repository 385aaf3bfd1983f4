"""Block compressors' shared statistic (compressor/block.py): the uniform sample of a block's inputs."""
import torch

from lrcompress.compressor.block import InputSample


def test_input_sample_is_uniform_bounded_and_mergeable():
    a, b = InputSample(capacity=8, seed=0), InputSample(capacity=8, seed=1)
    a.observe(torch.arange(20.0)[:, None].expand(20, 3), None)
    b.observe(torch.arange(20.0, 30.0)[:, None].expand(10, 3), None)
    a.merge(b)
    rows = a.sample()
    assert rows.shape == (8, 3) and len(set(rows[:, 0].tolist())) == 8
