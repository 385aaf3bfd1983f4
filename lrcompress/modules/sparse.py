"""Sparse linears whose storage really shrinks: kept values plus a bitmask, or plus N:M indices.

Storage accounting (exact, see ``storage_bytes``):
  * bitmask: nnz values in the model dtype + ceil(out·in / 8) bytes of mask;
  * N:M: out·in·N/M values + ceil(log2 M) bits per kept value for its position inside its group.
The weight is rebuilt densely on every forward call (a reference path; sparse kernels are not here).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedLinear, register_module_kind
from ..core.packing import pack_codes, packed_bytes, unpack_codes


class _SparseLinear(CompressedLinear):
    """Shared parts: a ``values`` parameter, an optional bias, dense-on-the-fly forward."""

    def _init_common(self, in_features: int, out_features: int, value_count: int, bias: bool,
                     dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(value_count, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def _copy_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def density(self) -> float:
        return self.values.numel() / (self.in_features * self.out_features)


@register_module_kind
class MaskedSparseLinear(_SparseLinear):
    """Unstructured sparsity: the kept values in row-major order and a 1-bit mask of their places."""

    kind = "sparse_mask"

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self._init_common(in_features, out_features, nnz, bias, dtype, device)
        self.register_buffer("mask", torch.zeros(packed_bytes(in_features * out_features, 1),
                                                 dtype=torch.uint8, device=device))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> "MaskedSparseLinear":
        """Keep ``weight[keep]`` (``keep``: bool, out × in)."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, int(keep.sum()), bias is not None, dtype, weight.device)
        with torch.no_grad():
            module.values.copy_(weight[keep].to(dtype))
            module.mask.copy_(pack_codes(keep.to(torch.int64), 1))
        module._copy_bias(bias)
        return module

    def keep_mask(self) -> torch.Tensor:
        count = self.in_features * self.out_features
        return unpack_codes(self.mask, 1, count).view(self.out_features, self.in_features).bool()

    def dense_weight(self) -> torch.Tensor:
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        weight[self.keep_mask()] = self.values
        return weight

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "nnz": self.values.numel(), "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "MaskedSparseLinear":
        return cls(spec["in_features"], spec["out_features"], spec["nnz"], spec["bias"], dtype)


def index_bits(group: int) -> int:
    """Bits that name one position among ``group`` (at least 1)."""
    return max(1, math.ceil(math.log2(group)))


@register_module_kind
class NMSparseLinear(_SparseLinear):
    """N:M sparsity: in every group of M consecutive inputs of a row, N values and their positions.

    ``values`` is (out × in/M × N) flattened, positions ascending inside each group; ``indices`` holds
    the positions packed in ceil(log2 M) bits each.
    """

    kind = "sparse_nm"

    def __init__(self, in_features: int, out_features: int, n: int, m: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % m:
            raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_features}")
        if not 0 < n < m:
            raise ValueError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
        self.n, self.m = n, m
        kept = out_features * (in_features // m) * n
        self._init_common(in_features, out_features, kept, bias, dtype, device)
        self.register_buffer("indices", torch.zeros(packed_bytes(kept, index_bits(m)), dtype=torch.uint8,
                                                    device=device))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, n: int, m: int, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> "NMSparseLinear":
        """Keep ``weight[keep]``; ``keep`` must select exactly N of every M consecutive inputs."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, n, m, bias is not None, dtype, weight.device)
        groups = keep.view(out_features, in_features // m, m)
        if not bool((groups.sum(dim=-1) == n).all()):
            raise ValueError(f"the mask does not keep exactly {n} of every {m} weights")
        # Positions of the kept entries, ascending: a stable sort of ~keep puts kept ones first in order.
        positions = torch.sort((~groups).to(torch.int8), dim=-1, stable=True).indices[..., :n]
        values = torch.gather(weight.view(out_features, in_features // m, m), -1, positions)
        with torch.no_grad():
            module.values.copy_(values.reshape(-1).to(dtype))
            module.indices.copy_(pack_codes(positions, index_bits(m)))
        module._copy_bias(bias)
        return module

    def positions(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features // self.m, self.n)
        return unpack_codes(self.indices, index_bits(self.m), self.values.numel()).view(shape)

    def dense_weight(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features // self.m, self.m)
        weight = torch.zeros(shape, dtype=self.values.dtype, device=self.values.device)
        weight.scatter_(-1, self.positions(), self.values.view(*shape[:2], self.n))
        return weight.view(self.out_features, self.in_features)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "n": self.n, "m": self.m, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "NMSparseLinear":
        return cls(spec["in_features"], spec["out_features"], spec["n"], spec["m"], spec["bias"], dtype)
