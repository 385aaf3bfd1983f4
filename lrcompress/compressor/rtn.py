"""``rtn``: round-to-nearest group quantization, the data-free baseline of weight quantization.

Every row is cut into groups of ``group_size`` consecutive inputs, each with its own asymmetric
grid (see ``quantgrid``); the codes are stored packed in a ``QuantizedLinear``. With ``apply_to: factors``
the factors an earlier low-rank or dictionary stage made are quantized instead (``factors``).
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..modules import dense_weight
from ..modules.quantized import QuantizedLinear
from .base import CompressResult, Compressor, Plan, register
from .factors import factor_spec, planned, quantize_factors
from .quantgrid import QuantConfig, quantized_linear, round_to_nearest
from .stats import Statistic, gram_of

Quantized = tuple[QuantizedLinear, str, dict[str, Any]]     # the module, its numerical path, record details


class QuantizingCompressor(Compressor):
    """Shared planning and dispatch of the methods whose output is a ``QuantizedLinear`` (of the whole
    weight, or of each factor of a factored module: ``apply_to: factors``)."""

    Config = QuantConfig
    config: QuantConfig

    @property
    def acts_on_factors(self) -> bool:
        return self.config.apply_to == "factors"

    def plan_factors(self, name: str, spec: dict[str, Any] | None, dtype: torch.dtype) -> Plan:
        return planned(factor_spec(name, spec, self.config, self.name), dtype)

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        gram = gram_of(stats).gram(name) if "gram" in self.needs else None
        if self.acts_on_factors:
            return quantize_factors(self, name, module, gram)
        replacement, path, details = self.quantize_matrix(dense_weight(module).detach(), gram,
                                                          getattr(module, "bias", None), name)
        return CompressResult(replacement, numerical_path=path, details=details)

    @abstractmethod
    def quantize_matrix(self, weight: torch.Tensor, gram: torch.Tensor | None, bias: torch.Tensor | None,
                        name: str) -> Quantized:
        """``weight`` (out × in) quantized, for inputs of Gram ``gram`` (None for a data-free method)."""

    def quantize_rows(self, weight: torch.Tensor, hessians: Callable[[slice], torch.Tensor] | None,
                      name: str) -> Quantized:
        """``weight`` quantized where every row has its own Hessian (``hessians(rows)``; dictionary values);
        a data-free method ignores them."""
        return self.quantize_matrix(weight, None, None, name)

    def plan(self, module: nn.Module) -> Plan:
        """Every weight stays one stored value (a code); the bytes are those of the packed module, built
        on the meta device (no memory) to count codes, scales, zeros and the permutation exactly."""
        bias = getattr(module, "bias", None)
        config = self.config
        skeleton = QuantizedLinear(module.in_features, module.out_features, config.bits,
                                   config.width(module.in_features), config.scale_dtype, bias=bias is not None,
                                   act_order=bool(getattr(config, "act_order", False)), dtype=module.weight.dtype,
                                   device="meta")
        return Plan(module.out_features * module.in_features + (bias.numel() if bias is not None else 0),
                    bytes_after=skeleton.storage_bytes())


@register("rtn")
class RoundToNearest(QuantizingCompressor):
    needs = frozenset()

    def quantize_matrix(self, weight: torch.Tensor, gram: torch.Tensor | None, bias: torch.Tensor | None,
                        name: str) -> Quantized:
        codes, scales, zeros = round_to_nearest(weight, self.config)
        replacement = quantized_linear(codes, scales, zeros, self.config, bias, weight.dtype)
        return replacement, "round-to-nearest", {"bits": self.config.bits, "group_size": replacement.group_size}
