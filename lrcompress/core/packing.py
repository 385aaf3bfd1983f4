"""Bit packing of small unsigned integer codes (quantization codes, sparse masks and N:M indices), and the
dequantization of packed quantization codes (shared by ``modules.quantized`` and the kernels' references).

Codes are laid out row-major and packed 8 at a time into ``bits`` bytes, little-endian inside the
group of 8: code k of a group occupies bits [k·bits, (k+1)·bits) of the group's 8·bits-bit word. The
group of 8 makes every width from 1 to 8 bits land on whole bytes, so one vectorized shift-and-mask
covers all widths and the stored size is exactly ceil(N/8)·bits bytes (N bytes for 8-bit codes, which need no packing).
Wider codes (9 to 32 bits: dictionary indices) use the same layout — it is one little-endian bit
stream, code k at bits [k·bits, (k+1)·bits) — packed through a bit matrix instead of 64-bit words.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy (8-bit codes are stored as they are)."""
    return count if bits == 8 else math.ceil(count / 8) * bits


PACK_CHUNK_CODES = 1 << 22     # codes packed per step: bounds the int64 temporaries (~0.5 GiB at 16 bits)


def pack_codes(codes: torch.Tensor, bits: int, chunk: int = PACK_CHUNK_CODES) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor.

    Packed ``chunk`` codes at a time (a multiple of 8, so every chunk ends on a whole byte): the int64
    working copies (one word, or one bit per index bit for wide codes) would otherwise be 8·bits bytes
    per code for the whole tensor at once — gigabytes for the dictionary indices of an 8B model's MLP.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) to pack them in {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    step = max(8, chunk - chunk % 8)
    return torch.cat([_pack_chunk(flat[start:start + step], bits) for start in range(0, flat.numel(), step)]
                     or [flat.new_empty(0, dtype=torch.uint8)])


def _pack_chunk(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` of one chunk (its length a multiple of 8 unless it is the last)."""
    flat = codes.to(torch.int64)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    if bits > 8:
        stream = (flat[:, None] >> torch.arange(bits, device=flat.device)) & 1          # [N, bits] bits
        weights = 1 << torch.arange(8, device=flat.device)
        return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)
    shifts = bits * torch.arange(8, device=flat.device, dtype=torch.int64)
    words = (flat.view(-1, 8) << shifts).sum(dim=1)          # ≤ 56 bits: no int64 overflow
    byte_shifts = 8 * torch.arange(bits, device=flat.device, dtype=torch.int64)
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes, as ``dtype``.

    This runs on every forward call of a quantized module, so it uses the narrowest integers that
    hold a group: widths dividing 8 unpack byte by byte in uint8 (the little-endian group layout is
    then the plain per-byte layout), 3 bits in int32 words (24 bits), 5–7 bits in int64 words.
    """
    _check_bits(bits)
    if packed.numel() != packed_bytes(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {count} codes of {bits} bits")
    raw = packed.reshape(-1)
    mask = 2**bits - 1
    if bits > 8:
        stream = (raw[:, None].to(torch.int64) >> torch.arange(8, device=raw.device)) & 1
        weights = 1 << torch.arange(bits, device=raw.device)
        return (stream.reshape(-1, bits) * weights).sum(dim=1)[:count].to(dtype)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=raw.device, dtype=torch.uint8)
        codes = (raw[:, None] >> shifts) & mask
    else:
        wide = torch.int32 if 8 * bits <= 31 else torch.int64
        groups = raw.view(-1, bits)
        words = groups[:, 0].to(wide)
        for j in range(1, bits):
            words = words | (groups[:, j].to(wide) << (8 * j))
        shifts = bits * torch.arange(8, device=raw.device, dtype=wide)
        codes = (words[:, None] >> shifts) & mask
    return codes.reshape(-1)[:count].to(dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               perm: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """Ŵ in float32 (out × in, input order) from the stored tensors of a :class:`QuantizedLinear`:
    packed codes, ``scales`` as float values and ``zeros``, both out × groups, and the act-order ``perm``.

    float32 is exact here: (q − z) is a small integer and the scale has ≤ 24 mantissa bits. Groups as a
    (out × groups × width) view; a ragged last group is padded, then cut off.
    """
    out_features, groups = scales.shape
    codes = unpack_codes(qweight, bits, out_features * in_features, torch.float32).view(out_features, in_features)
    pad = groups * group_size - in_features
    if pad:
        codes = F.pad(codes, (0, pad))
    scale = scales.to(torch.float32)[:, :, None]
    zero = zeros.to(torch.float32)[:, :, None]
    stored = ((codes.view(out_features, groups, group_size) - zero) * scale).view(out_features, -1)[:, :in_features]
    if perm is None:
        return stored
    weight = torch.empty_like(stored)
    weight[:, perm.long()] = stored
    return weight


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ValueError(f"bit width must be between 1 and 32, got {bits}")
