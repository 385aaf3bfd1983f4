"""Bit packing round-trips exactly and takes exactly ceil(N/8)·bits bytes."""
import pytest
import torch

from lrcompress.core.packing import pack_codes, packed_bytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 13, 1000])
def test_pack_unpack_round_trips_every_width(bits, count):
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(count, bits) == (count if bits == 8 else -(-count // 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_layout_is_little_endian_inside_groups_of_eight():
    # 3-bit codes 0..7: word = Σ k·8^k; its low byte is 0b10_001_000 = 0x88 (codes 0, 1 and low bits of 2)
    word = sum(k << (3 * k) for k in range(8))
    assert pack_codes(torch.arange(8), 3).tolist() == [(word >> (8 * b)) & 0xFF for b in range(3)]


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match="in \\[0, 8\\)"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 8)


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 12, 17])
@pytest.mark.parametrize("count", [0, 5, 64, 1003])
@pytest.mark.parametrize("chunk", [8, 13, 40])
def test_packing_in_chunks_gives_the_same_bytes(bits, count, chunk):
    """Chunks bound the int64 temporaries; a chunk that is not a multiple of 8 is rounded down to one."""
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits + count))
    whole = pack_codes(codes, bits, chunk=1 << 30)
    assert torch.equal(pack_codes(codes, bits, chunk=chunk), whole)
    assert whole.numel() == packed_bytes(count, bits)
    assert torch.equal(unpack_codes(whole, bits, count), codes)
