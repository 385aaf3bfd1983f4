"""Data-free quantization of token embeddings: the family's scale is found and checked, the symmetric grid
reproduces a Q8_0 table exactly, and rounding stays within a step of every value."""
import pytest
import torch
from torch import nn

from helpers import tiny_model
from lrcompress.compressor.embedding import embed_scale_of, quantize_embedding
from lrcompress.compressor.quantgrid import QuantConfig


def test_gemma_scales_its_rows_by_the_root_of_the_width():
    model = tiny_model("gemma", hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8)
    assert embed_scale_of(model.model.embed_tokens) == pytest.approx(32 ** 0.5)
    assert embed_scale_of(nn.Embedding(10, 4)) == 1.0


def test_a_module_that_is_not_a_lookup_is_refused():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    with pytest.raises(ValueError, match="not a row of its weight"):
        embed_scale_of(Shifted(10, 4))


def test_the_symmetric_8_bit_grid_of_blocks_of_32_reproduces_a_q8_0_table():
    """Q8_0 (llama.cpp): blocks of 32 with a float16 step d = max|w|/127 and codes in [−127, 127]."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (40, 64), generator=g)
    codes[:, ::32] = 127                                      # every block reaches ±127, as Q8_0's do
    steps = (torch.rand(40, 2, generator=g) * 0.01 + 1e-3).half().float()
    table = codes.float() * steps.repeat_interleave(32, dim=1)
    exact = quantize_embedding(nn.Embedding.from_pretrained(table), QuantConfig(bits=8, group_size=32), True)
    assert torch.equal(exact.dense_weight(), table)
    rounded = quantize_embedding(nn.Embedding.from_pretrained(table), QuantConfig(bits=8, group_size=32), False)
    assert not torch.equal(rounded.dense_weight(), table)    # the asymmetric grid has other points


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
def test_rounding_stays_within_a_step(bits, symmetric):
    """Half a step inside the grid; at its ends the float16 rounding of the step, times up to 255 levels,
    can leave the extreme value up to ≈ 0.12 step further out."""
    table = torch.randn(30, 48, generator=torch.Generator().manual_seed(1))
    module = quantize_embedding(nn.Embedding.from_pretrained(table), QuantConfig(bits=bits, group_size=16), symmetric)
    step = module.scale_values().float().repeat_interleave(16, dim=1)
    assert ((module.dense_weight() - table).abs() <= 0.625 * step).all()
