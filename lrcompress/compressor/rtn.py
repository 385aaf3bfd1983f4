"""``rtn``: round-to-nearest group quantization, the data-free baseline of weight quantization.

Every row is cut into groups of ``group_size`` consecutive inputs, each with its own asymmetric
grid (see ``quantgrid``); the codes are stored packed in a ``QuantizedLinear``.
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

from ..modules import dense_weight
from ..modules.quantized import QuantizedLinear
from .base import CompressResult, Compressor, Plan, register
from .quantgrid import QuantConfig, quantized_linear, round_to_nearest
from .stats import Statistic


class QuantizingCompressor(Compressor):
    """Shared planning of the methods whose output is a ``QuantizedLinear``."""

    Config = QuantConfig
    config: QuantConfig

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

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        weight = dense_weight(module).detach()
        codes, scales, zeros = round_to_nearest(weight, self.config)
        replacement = quantized_linear(codes, scales, zeros, self.config, getattr(module, "bias", None), weight.dtype)
        return CompressResult(replacement, numerical_path="round-to-nearest",
                              details={"bits": self.config.bits, "group_size": replacement.group_size})
