"""SparseDictLinear: y = (x·D)·S + b, a dense dictionary times a column-sparse coefficient matrix.

S (k × out) has exactly s nonzeros per column, stored in a fixed-nnz layout: ``values`` [s, out] in
the model dtype and ``indices`` [s, out] (int16 when k < 32768, else int32), so every output column
costs the same and the forward is a gather (``triton_kernels.sparse_dict_matmul``).

A dictionary may be shared by several modules (CoSpaDi's per-group mode): they hold the same
Parameter, the checkpoint stores it once (an alias in the "tied" list), and each module's
``stored_params`` is charged its share of the dictionary so that the shares add up exactly.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import triton_kernels
from .base import CompressedLinear, register_module_kind

INT16_ATOMS = 32768


def index_dtype_for(atoms: int) -> torch.dtype:
    return torch.int16 if atoms < INT16_ATOMS else torch.int32


def index_cost(atoms: int, value_dtype: torch.dtype) -> float:
    """Bytes of one stored index per byte of one stored value (int16 index, float32 value: 0.5)."""
    return index_dtype_for(atoms).itemsize / value_dtype.itemsize


def index_bytes(count: int, atoms: int) -> int:
    """Bytes of ``count`` stored indices into a dictionary of ``atoms`` atoms."""
    return count * index_dtype_for(atoms).itemsize


def index_params(count: int, atoms: int, value_dtype: torch.dtype) -> int:
    """Stored indices in units of stored values: index bytes / bytes per value, rounded up."""
    return math.ceil(index_bytes(count, atoms) / value_dtype.itemsize)


def sparse_dict_params(in_features: int, out_features: int, atoms: int, sparsity: int, value_dtype: torch.dtype,
                       bias: bool, dictionary_share: int | None = None) -> int:
    """What ``SparseDictLinear.stored_params`` reports, from the shapes alone (a compressor's plan)."""
    share = in_features * atoms if dictionary_share is None else dictionary_share
    values = sparsity * out_features
    return share + values + index_params(values, atoms, value_dtype) + (out_features if bias else 0)


def dictionary_shares(in_features: int, atoms: int, members: int) -> list[int]:
    """Split the d_in·k dictionary values among ``members`` modules; the shares sum exactly."""
    total = in_features * atoms
    base, extra = divmod(total, members)
    return [base + (1 if i < extra else 0) for i in range(members)]


@register_module_kind
class SparseDictLinear(CompressedLinear):
    kind = "sparse_dict"

    def __init__(self, in_features: int, out_features: int, atoms: int, sparsity: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 dictionary: nn.Parameter | None = None, dictionary_share: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.atoms, self.sparsity = atoms, sparsity
        if dictionary is None:
            dictionary = nn.Parameter(torch.empty(in_features, atoms, dtype=dtype, device=device))
        if tuple(dictionary.shape) != (in_features, atoms):
            raise ValueError(f"dictionary shape {tuple(dictionary.shape)} != ({in_features}, {atoms})")
        self.dictionary = dictionary
        self.dictionary_share = in_features * atoms if dictionary_share is None else dictionary_share
        self.values = nn.Parameter(torch.empty(sparsity, out_features, dtype=dtype, device=device))
        self.register_buffer("indices", torch.zeros(sparsity, out_features, dtype=index_dtype_for(atoms),
                                                    device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_code(cls, dictionary: nn.Parameter | torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  bias: torch.Tensor | None, dtype: torch.dtype, dictionary_share: int | None = None
                  ) -> "SparseDictLinear":
        """Build from D [in, k] (a Parameter to share it), indices/values [s, out]; cast to ``dtype``."""
        in_features, atoms = dictionary.shape
        sparsity, out_features = values.shape
        if not isinstance(dictionary, nn.Parameter):
            dictionary = nn.Parameter(dictionary.detach().to(dtype))
        module = cls(in_features, out_features, atoms, sparsity, bias=bias is not None, dtype=dtype,
                     device=values.device, dictionary=dictionary, dictionary_share=dictionary_share)
        if indices.min() < 0 or indices.max() >= atoms:
            raise ValueError("indices out of range of the dictionary")
        with torch.no_grad():
            module.values.copy_(values.to(dtype))
            module.indices.copy_(indices.to(module.indices.dtype))
            if bias is not None:
                module.bias.copy_(bias.to(dtype))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = triton_kernels.sparse_dict_matmul(x @ self.dictionary, self.indices, self.values)
        return y + self.bias if self.bias is not None else y

    def coefficients(self) -> torch.Tensor:
        """S as a dense k × out matrix."""
        dense = torch.zeros(self.atoms, self.out_features, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_add_(0, self.indices.long(), self.values)

    def dense_weight(self) -> torch.Tensor:
        return (self.dictionary @ self.coefficients()).T

    def index_params(self) -> int:
        """The indices in units of stored values (bytes of indices / bytes per value, rounded up)."""
        return index_params(self.indices.numel(), self.atoms, self.values.dtype)

    def stored_params(self) -> int:
        return sparse_dict_params(self.in_features, self.out_features, self.atoms, self.sparsity, self.values.dtype,
                                  self.bias is not None, self.dictionary_share)

    def storage_bytes(self) -> int:
        """Checkpoint bytes, with a shared dictionary charged at this module's share."""
        tensors = [self.values, self.indices] + ([self.bias] if self.bias is not None else [])
        return (self.dictionary_share * self.dictionary.element_size()
                + sum(t.numel() * t.element_size() for t in tensors))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "atoms": self.atoms, "sparsity": self.sparsity, "bias": self.bias is not None,
                "index_dtype": str(self.indices.dtype).removeprefix("torch."),
                "dictionary_share": self.dictionary_share}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "SparseDictLinear":
        module = cls(spec["in_features"], spec["out_features"], spec["atoms"], spec["sparsity"],
                     bias=spec["bias"], dtype=dtype, dictionary_share=spec.get("dictionary_share"))
        if str(module.indices.dtype).removeprefix("torch.") != spec.get("index_dtype", "int16"):
            raise ValueError(f"index dtype {spec.get('index_dtype')} does not match {spec['atoms']} atoms")
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
                f"sparsity={self.sparsity}, index_dtype={str(self.indices.dtype).removeprefix('torch.')}")
