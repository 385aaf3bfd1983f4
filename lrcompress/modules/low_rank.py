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

Quantized factors (an ``rtn``/``gptq`` stage with ``apply_to: factors``, docs/quantized-factors.md): either
factor may be a ``QuantizedLinear`` (packed codes, scales, zeros; ``up`` keeps the bias) instead of an
``nn.Linear``. The spec then nests both factors' specs under ``factors`` (absent: two plain Linears, the
layout of every earlier checkpoint), and the forward runs the two quantized modules in turn: their
product would be a dense m×n matrix, larger than the packed factors, so it is never built.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import (CompressedLinear, column_major, dense_weight, module_from_spec, module_spec, register_module_kind,
                   stored_params)


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

    @classmethod
    def from_modules(cls, down: nn.Module, up: nn.Module) -> "LowRankLinear":
        """Wrap two factor modules (``nn.Linear`` or ``QuantizedLinear``): ``down`` (in → r, no bias) and
        ``up`` (r → out, the bias)."""
        if down.out_features != up.in_features or getattr(down, "bias", None) is not None:
            raise ValueError(f"factors {up.out_features}×{up.in_features} · {down.out_features}×{down.in_features} "
                             "do not chain (or down has a bias)")
        module = cls(down.in_features, up.out_features, down.out_features, device="meta")
        module.down, module.up = down, up
        return module

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    @property
    def factors_quantized(self) -> bool:
        """Whether a factor is stored in a packed form (not a plain ``nn.Linear``)."""
        return type(self.down) is not nn.Linear or type(self.up) is not nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._product is not None and not x.requires_grad:
            return F.linear(x, self._product.to(x.dtype), self.up.bias)
        if self.factors_quantized:
            return self.up(self.down(x))
        return F.linear(F.linear(x, self.down.weight), self.up.weight, self.up.bias)

    def dense_is_not_larger(self) -> bool:
        """Whether the factors hold at least as many values as the dense weight."""
        return self.rank * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def prepare_inference(self) -> None:
        """Quantized factors prepare themselves (``prepare_for_inference`` reaches nested modules)."""
        self._product = None
        if self.factors_quantized:
            return
        if self.dense_is_not_larger():
            self._product = self.dense_weight().detach()
            column_major(self._product)
        else:
            column_major(self.down.weight)
            column_major(self.up.weight)

    def inference_tensors(self) -> list[torch.Tensor]:
        return [] if self._product is None else [self._product]

    def release_inference(self) -> None:
        self._product = None

    def dense_weight(self) -> torch.Tensor:
        return dense_weight(self.up) @ dense_weight(self.down)

    def stored_params(self) -> int:
        """Every factor value (a code when quantized) and the bias; a quantized factor's scales and zeros are
        metadata, counted by ``storage_bytes``."""
        return stored_params(self.down) + stored_params(self.up)

    def spec(self) -> dict[str, Any]:
        spec = {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.up.bias is not None}
        if self.factors_quantized:
            spec["factors"] = {"down": module_spec(self.down), "up": module_spec(self.up)}
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "LowRankLinear":
        factors = spec.get("factors")
        if factors is not None:
            return cls.from_modules(module_from_spec(factors["down"], dtype), module_from_spec(factors["up"], dtype))
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
