"""Base class of the modules that compressed weights become, and the registry the loader uses."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

MODULE_KINDS: dict[str, type["CompressedLinear"]] = {}


def register_module_kind(cls: type["CompressedLinear"]) -> type["CompressedLinear"]:
    MODULE_KINDS[cls.kind] = cls
    return cls


class CompressedLinear(nn.Module):
    """A drop-in replacement of ``nn.Linear`` whose weight is stored in a compressed form.

    Subclasses describe their shape in ``spec()`` (saved in config.json) so that the loader can
    rebuild an empty module of the right shape with ``from_spec`` before reading the tensors.
    """

    kind: ClassVar[str]
    in_features: int
    out_features: int

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "CompressedLinear":
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight (out × in), for errors, export and later stages."""
        raise NotImplementedError

    def stored_params(self) -> int:
        """Number of stored values, the unit of the ratio accounting."""
        return sum(p.numel() for p in self.parameters())


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The effective (out × in) weight of a Linear or of any compressed replacement."""
    if isinstance(module, CompressedLinear):
        return module.dense_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor a compressed linear module")


def stored_params(module: nn.Module) -> int:
    if isinstance(module, CompressedLinear):
        return module.stored_params()
    return sum(p.numel() for p in module.parameters())


def to_dense_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function (for the dense export)."""
    weight = dense_weight(module).detach()
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
