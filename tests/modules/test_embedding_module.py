"""QuantizedEmbedding: a lookup dequantizes exactly the rows of the stored table, the bytes are the packed
layout's, and a tied head multiplies by the very same codes without storing anything of its own."""
import pytest
import torch
import torch.nn.functional as F

from lrcompress.compressor.quantgrid import QuantConfig, round_to_nearest
from lrcompress.modules import (MODULE_KINDS, QuantizedEmbedding, ScaledEmbedding, TiedQuantizedHead, module_from_spec,
                                storage_bytes)
from lrcompress.pipeline.bytebudget import state_bytes


def _embedding(rows: int, dim: int, bits: int, group: int, scale: float = 1.0, seed: int = 0) -> QuantizedEmbedding:
    weight = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    codes, scales, zeros = round_to_nearest(weight, QuantConfig(bits=bits, group_size=group))
    settings = {"bits": bits, "group_size": group, "scale_dtype": "float16", "embed_scale": scale, "symmetric": False}
    return QuantizedEmbedding.from_codes(codes, scales, zeros, settings, torch.float32)


@pytest.mark.parametrize("dim, bits, group", [(64, 4, 16), (64, 3, 32), (36, 3, 12), (36, 8, 36), (40, 2, 7)])
def test_a_lookup_is_the_stored_table_row_for_row(dim, bits, group):
    """Rows that start on a byte (8-bit codes, or d a multiple of 8) are gathered packed; others (3 bits,
    d = 36) dequantize the table; both equal F.embedding on the dequantized table exactly."""
    module = _embedding(50, dim, bits, group, scale=1.5)
    ids = torch.tensor([[0, 49, 7, 7], [3, 12, 0, 48]])
    expected = F.embedding(ids, module.dense_weight()) * torch.tensor(1.5)
    assert torch.equal(module(ids), expected)


def test_the_stored_bytes_are_the_packed_codes_scales_and_zeros():
    module = _embedding(50, 64, 4, 16)
    assert storage_bytes(module) == 50 * 64 // 2 + 50 * 4 * (2 + 1)
    assert storage_bytes(_embedding(50, 36, 3, 12)) == (50 * 36 // 8) * 3 + 50 * 3 * 3


def test_the_tied_head_multiplies_by_the_same_codes_and_stores_nothing():
    embedding = _embedding(50, 64, 4, 16)
    head = TiedQuantizedHead.tie(embedding)
    assert head.qweight is embedding.qweight and head.scales is embedding.scales and head.zeros is embedding.zeros
    x = torch.randn(3, 64)
    assert torch.equal(head(x), F.linear(x, embedding.dense_weight()))
    assert storage_bytes(head) == 0 and head.stored_params() == 0
    both = torch.nn.ModuleDict({"embed": embedding, "head": head})
    assert state_bytes(both) == storage_bytes(embedding)          # one copy of the shared tensors


def test_specs_rebuild_the_same_module_kinds():
    module = _embedding(50, 64, 4, 16, scale=8.0)
    rebuilt = module_from_spec(module.spec(), torch.float32)
    assert isinstance(rebuilt, QuantizedEmbedding) and rebuilt.spec() == module.spec()
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt(torch.tensor([4, 5])), module(torch.tensor([4, 5])))
    head = TiedQuantizedHead.tie(module)
    assert MODULE_KINDS[head.spec()["kind"]] is TiedQuantizedHead


def test_the_dense_form_keeps_the_scale():
    module = _embedding(50, 64, 4, 16, scale=8.0)
    dense = module.to_dense()
    assert isinstance(dense, ScaledEmbedding)
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(dense(ids), module(ids))
