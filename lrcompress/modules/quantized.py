"""QuantizedLinear: packed integer codes + per-group scales and zero points.

The reference forward dequantizes the weight on every call (exact; what the compression pipeline
uses on the CPU). After loading, :meth:`QuantizedLinear.prepare_inference` builds the weight once in the
layout of PyTorch's packed int4 CPU kernel (``cpu_kernels.py``), which the forward then uses on CPU
inputs. On a CUDA device the forward multiplies straight from the packed codes with the Triton kernel
(``triton_kernels/quantized.py``, through the dispatch: the torch reference where Triton is absent or
``LRCOMPRESS_KERNELS=reference``), prepared or not; the dense weight is never built there.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import triton_kernels
from ..core.packing import dequantize, pack_codes, packed_bytes, unpack_codes
from .base import CompressedLinear, column_major, register_module_kind
from .cpu_kernels import PackedInt4Weight, int4_kernel_available, kernel_group

# Scales are kept as the raw bits of their float format in an integer buffer of the same width, so that
# ``model.to(dtype)`` (which casts every floating tensor) never changes what is stored or its size.
SCALE_FORMATS: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float16": (torch.float16, torch.int16),
    "bfloat16": (torch.bfloat16, torch.int16),
    "float32": (torch.float32, torch.int32),
}


def register_codes(module: nn.Module, rows: int, columns: int, device: torch.device | str | None) -> None:
    """The buffers of a rows × columns table of codes grouped along its rows, for a module whose ``bits``,
    ``group_size`` and ``scale_dtype`` are set: ``qweight`` (packed), ``scales`` (raw float bits) and
    ``zeros`` (uint8), both rows × groups. Shared by ``QuantizedLinear`` and ``QuantizedEmbedding``."""
    if module.scale_dtype not in SCALE_FORMATS:
        raise ValueError(f"scale_dtype must be one of {sorted(SCALE_FORMATS)}, got {module.scale_dtype!r}")
    groups = math.ceil(columns / module.group_size)
    raw = SCALE_FORMATS[module.scale_dtype][1]
    module.register_buffer("qweight", torch.zeros(packed_bytes(rows * columns, module.bits), dtype=torch.uint8,
                                                  device=device))
    module.register_buffer("scales", torch.zeros(rows, groups, dtype=raw, device=device))
    module.register_buffer("zeros", torch.zeros(rows, groups, dtype=torch.uint8, device=device))


class KernelOperands(NamedTuple):
    """What the device kernel reads: views of the module's buffers (no copy), ``scales`` as floats."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None


@register_module_kind
class QuantizedLinear(CompressedLinear):
    """W[i, j] = (q[i, j] − z[i, g(j)]) · s[i, g(j)], asymmetric integer codes q of ``bits`` bits.

    Columns form groups of ``group_size`` consecutive inputs (the last group may be shorter). With
    ``act_order`` the codes are stored in the column order in which GPTQ quantized them and ``perm``
    maps them back: W[:, perm[k]] = Ŵ_stored[:, k]; groups are contiguous in the stored order.
    Tensors: ``qweight`` (uint8, packed), ``scales`` (raw float bits), ``zeros`` (uint8 per group),
    optional ``perm`` (int32) and ``bias`` (model dtype).
    """

    kind = "quantized"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 scale_dtype: str = "float16", bias: bool = False, act_order: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scale_dtype = bits, min(group_size, in_features), scale_dtype
        self.act_order = act_order
        self.dtype = dtype or torch.get_default_dtype()
        register_codes(self, out_features, in_features, device)
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        else:
            self.perm = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.dtype, device=device)) if bias else None
        self._inference: PackedInt4Weight | torch.Tensor | None = None   # built by prepare_inference (CPU)
        self._operands: KernelOperands | None = None                      # built by prepare_inference (device)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, scale_dtype: str, bias: torch.Tensor | None, dtype: torch.dtype,
                   perm: torch.Tensor | None = None) -> "QuantizedLinear":
        """Build from codes (out × in, stored column order), scales and zero points (out × groups).

        ``scales`` must already be representable in ``scale_dtype`` (the quantizer rounds them
        before computing codes, so that the stored module reproduces its computation exactly).
        """
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bits, group_size, scale_dtype, bias=bias is not None,
                     act_order=perm is not None, dtype=dtype, device=codes.device)
        float_format = SCALE_FORMATS[scale_dtype][0]
        with torch.no_grad():
            module.qweight.copy_(pack_codes(codes, bits))
            module.scales.copy_(scales.to(float_format).view(module.scales.dtype))
            module.zeros.copy_(zeros.to(torch.uint8))
            if perm is not None:
                module.perm.copy_(perm.to(torch.int32))
            if bias is not None:
                module.bias.copy_(bias.to(dtype))
        return module

    def codes(self, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The integer codes (out × in, stored column order)."""
        count = self.out_features * self.in_features
        return unpack_codes(self.qweight, self.bits, count, dtype).view(self.out_features, self.in_features)

    def scale_values(self) -> torch.Tensor:
        return self.scales.view(SCALE_FORMATS[self.scale_dtype][0])

    def dense_weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale_values(), self.zeros, self.bits, self.group_size, self.perm,
                          self.in_features).to(self.dtype)

    def kernel_operands(self) -> KernelOperands:
        """The buffers as the device kernel takes them (views: they cost no memory)."""
        perm = None if self.perm is None else self.perm.to(torch.int32)
        return KernelOperands(self.qweight, self.scale_values(), self.zeros, perm)

    def prepare_inference(self) -> None:
        """Build the weight once for fast CPU inference: in the packed int4 kernel's layout, or, for a
        group size the kernel cannot express, dequantized (as fast as dense, as large as dense). On a
        device, keep the kernel's operands (views of the buffers) so that a forward does not rebuild them."""
        self._operands = None
        if self.qweight.device.type != "cpu":
            self._inference = None
            self._operands = self.kernel_operands()
        elif int4_kernel_available() and kernel_group(self.group_size, self.in_features) is not None:
            self._inference = PackedInt4Weight(self.codes(torch.int32), self.scale_values(), self.zeros, self.bits,
                                               self.group_size, self.perm)
        else:
            self._inference = self.dense_weight().detach()
            column_major(self._inference)

    def inference_tensors(self) -> list[torch.Tensor]:
        prepared = self._inference
        if prepared is None:
            return []
        return [prepared] if isinstance(prepared, torch.Tensor) else prepared.tensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" and not x.requires_grad:
            operands = self._operands
            if operands is None or operands.qweight is not self.qweight:    # unprepared, or moved since
                operands = self.kernel_operands()
            # a bias that is being trained is added outside the kernel, so that its gradient flows
            trained = self.bias is not None and self.bias.requires_grad and torch.is_grad_enabled()
            y = triton_kernels.quantized_matmul(x, operands.qweight, operands.scales, operands.zeros, self.bits,
                                                self.group_size, operands.perm, None if trained else self.bias)
            return y + self.bias.to(y.dtype) if trained else y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        prepared = self._inference
        if prepared is None or x.device.type != "cpu" or x.requires_grad:
            return F.linear(x, self.dense_weight().to(x.dtype), bias)
        if isinstance(prepared, torch.Tensor):
            return F.linear(x, prepared.to(x.dtype), bias)
        y = prepared.matmul(x)
        return y if bias is None else y + bias

    def stored_params(self) -> int:
        """Every weight is still one stored value (a code); scales, zeros and perm are metadata that
        :meth:`storage_bytes` counts."""
        return self.out_features * self.in_features + (self.bias.numel() if self.bias is not None else 0)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "scale_dtype": self.scale_dtype,
                "act_order": self.act_order, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "QuantizedLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                   spec["scale_dtype"], bias=spec["bias"], act_order=spec["act_order"], dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.act_order}")
