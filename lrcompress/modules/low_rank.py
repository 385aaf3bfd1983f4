"""LowRankLinear: y = B·(A·x) + b, the module of every low-rank compressor.

Inference (batch-1 decode on CPU, measured in bench/RESULTS.md): the forward calls ``F.linear``
on the two factors directly, not the two ``nn.Linear`` submodules — a module call costs a few µs of
Python, as much as the whole product of a small factor at one token. When the factors hold at least
as many values as the dense weight, r·(in + out) ≥ in·out, the two thin products cannot be cheaper
than one dense one, and the dense product B·A takes no more memory than the factors:
:meth:`LowRankLinear.prepare_inference` then builds it once and the forward is one matmul. Below
that size the factored form is kept (the size-honest rule: inference never holds more than the
factors' size in extra memory for a module whose point is to be smaller). Either way the weights are
stored column-major (:func:`~lrcompress.modules.base.column_major`), the layout the BLAS streams fastest
at one token.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedLinear, column_major, register_module_kind


@register_module_kind
class LowRankLinear(CompressedLinear):
    """Two thin linears: ``down`` (A, rank × in) then ``up`` (B, out × rank, carries the bias).

    Stored as two standard ``nn.Linear`` so that the factors keep familiar names in safetensors
    (``<module>.down.weight``, ``<module>.up.weight``) and export directly as LoRA-style pairs.
    """

    kind = "low_rank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)
        self._product: torch.Tensor | None = None     # B·A, built by prepare_inference when not larger

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> "LowRankLinear":
        """Build from B (out × r) and A (r × in); factors are cast to ``dtype``."""
        out_features, rank = up.shape
        module = cls(down.shape[1], out_features, rank, bias=bias is not None, dtype=dtype,
                     device=up.device)
        with torch.no_grad():
            module.up.weight.copy_(up.to(dtype))
            module.down.weight.copy_(down.to(dtype))
            if bias is not None:
                module.up.bias.copy_(bias.to(dtype))
        return module

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._product is not None and not x.requires_grad:
            return F.linear(x, self._product.to(x.dtype), self.up.bias)
        return F.linear(F.linear(x, self.down.weight), self.up.weight, self.up.bias)

    def dense_is_not_larger(self) -> bool:
        """Whether the factors hold at least as many values as the dense weight."""
        return self.rank * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def prepare_inference(self) -> None:
        self._product = None
        if self.dense_is_not_larger():
            self._product = self.dense_weight().detach()
            column_major(self._product)
        else:
            column_major(self.down.weight)
            column_major(self.up.weight)

    def inference_tensors(self) -> list[torch.Tensor]:
        return [] if self._product is None else [self._product]

    def dense_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.up.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
