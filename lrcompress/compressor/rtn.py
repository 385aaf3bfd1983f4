"""``rtn``: round-to-nearest group quantization, the data-free baseline of weight quantization.

Every row is cut into groups of ``group_size`` consecutive inputs, each with its own asymmetric
grid (see ``quantgrid``); the codes are stored packed in a ``QuantizedLinear``.
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

from ..modules import dense_weight
from .base import CompressResult, Compressor, Plan, register
from .quantgrid import QuantConfig, quantized_linear, round_to_nearest
from .stats import Statistic


class QuantizingCompressor(Compressor):
    """Shared planning of the methods whose output is a ``QuantizedLinear``."""

    Config = QuantConfig
    config: QuantConfig

    def plan(self, module: nn.Module) -> Plan:
        bias = getattr(module, "bias", None)
        return Plan(module.out_features * module.in_features + (bias.numel() if bias is not None else 0))


@register("rtn")
class RoundToNearest(QuantizingCompressor):
    needs = frozenset()

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        weight = dense_weight(module).detach()
        codes, scales, zeros = round_to_nearest(weight, self.config)
        replacement = quantized_linear(codes, scales, zeros, self.config, getattr(module, "bias", None), weight.dtype)
        return CompressResult(replacement, numerical_path="round-to-nearest",
                              details={"bits": self.config.bits, "group_size": replacement.group_size})
