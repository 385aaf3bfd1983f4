"""CompensatedLinear: a compressed base plus a low-rank residual path, y = base(x) + B·(A·x).

The base is whatever the module held before compensation (any compressed module or a plain
``nn.Linear``); ``down`` (A, rank × in) and ``up`` (B, out × rank) are ``nn.Linear`` or, when the
factors are quantized, ``QuantizedLinear``. The spec nests the specs of all three, so the
checkpoint loader rebuilds the whole tree; tensors are ``<name>.base.*``, ``<name>.down.*``,
``<name>.up.*`` and export as a LoRA adapter over the densified base.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import (CompressedLinear, column_major, dense_weight, module_from_spec, module_spec, register_module_kind,
                   storage_bytes, stored_params)


@register_module_kind
class CompensatedLinear(CompressedLinear):
    kind = "compensated"

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if down.in_features != self.in_features or up.out_features != self.out_features \
                or down.out_features != up.in_features:
            raise ValueError(f"residual factors {up.out_features}×{up.in_features} · "
                             f"{down.out_features}×{down.in_features} do not fit a "
                             f"{self.out_features}×{self.in_features} base")
        self.rank = down.out_features
        self.base, self.down, self.up = base, down, up

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + _apply(self.up, _apply(self.down, x))

    def prepare_inference(self) -> None:
        """Plain Linear factors column-major (the base and quantized factors prepare themselves)."""
        for factor in (self.down, self.up):
            if type(factor) is nn.Linear:
                column_major(factor.weight)

    def residual_weight(self) -> torch.Tensor:
        """B·A, the dense (out × in) correction."""
        return dense_weight(self.up) @ dense_weight(self.down)

    def dense_weight(self) -> torch.Tensor:
        base = dense_weight(self.base)
        return base + self.residual_weight().to(base.dtype)

    def stored_params(self) -> int:
        return stored_params(self.base) + stored_params(self.down) + stored_params(self.up)

    def storage_bytes(self) -> int:
        return storage_bytes(self.base) + storage_bytes(self.down) + storage_bytes(self.up)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "base": module_spec(self.base), "down": module_spec(self.down),
                "up": module_spec(self.up)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "CompensatedLinear":
        return cls(module_from_spec(spec["base"], dtype), module_from_spec(spec["down"], dtype),
                   module_from_spec(spec["up"], dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, without the cost of a module call for a plain Linear factor (a few µs of Python,
    as much as a rank-16 factor's product at one decode token)."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)
