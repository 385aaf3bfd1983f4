"""Round-to-nearest quantization of a token embedding (and of an untied LM head), data-free.

Why data-free: an embedding row is read, not multiplied: a token's row enters the residual stream as it is,
so the error that matters is the row's own error, weighted by how often the token occurs. There is no input
Gram to weight the columns with (GPTQ's Hessian would be the identity scaled by the token's frequency), so
round-to-nearest per group of a row *is* the least-squares grid choice per row; llama.cpp quantizes
``token_embd`` the same way (its quantizers are per-block round-to-nearest with no activation data unless
an importance matrix is given). The grid is ``quantgrid``'s (asymmetric, or symmetric as Q8_0).
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import QuantizedLinear
from ..modules.embedding import QuantizedEmbedding
from .quantgrid import QuantConfig, quantized_linear, round_to_nearest


def embed_scale_of(module: nn.Module) -> float:
    """The factor a family's embedding multiplies its rows by (Gemma's √d), 1 for a plain ``nn.Embedding``.
    Raises ValueError when the module's lookup is not scale × row (it could not be replaced faithfully)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(module).__name__} has no 2-D weight: not a token embedding")
    scale = float(getattr(module, "scalar_embed_scale", 1.0))
    if weight.device.type == "meta":
        return scale
    ids = torch.arange(min(8, weight.shape[0]), device=weight.device)
    with torch.no_grad():
        found = module(ids)
        expected = weight[ids] * torch.tensor(scale, dtype=weight.dtype, device=weight.device)
    if found.shape != expected.shape or not torch.equal(found, expected):
        raise ValueError(f"{type(module).__name__}'s lookup is not a row of its weight times {scale:g}: "
                         "lrcompress cannot replace it by a quantized table")
    return scale


def quantize_embedding(module: nn.Module, config: QuantConfig, symmetric: bool) -> QuantizedEmbedding:
    """The embedding ``module`` (``nn.Embedding`` or a family's scaled subclass) as packed codes; rows are
    the quantized dimension, groups run along the features (``config.group_size`` of them, null: the row)."""
    weight = module.weight.detach()
    codes, scales, zeros = round_to_nearest(weight, config, symmetric)
    settings = {"bits": config.bits, "group_size": config.width(weight.shape[1]), "scale_dtype": config.scale_dtype,
                "embed_scale": embed_scale_of(module), "symmetric": symmetric}
    return QuantizedEmbedding.from_codes(codes, scales, zeros, settings, weight.dtype)


def quantize_head(head: nn.Linear, config: QuantConfig, symmetric: bool) -> QuantizedLinear:
    """An untied LM head on the same grid as the embedding: an ordinary ``QuantizedLinear``."""
    weight = head.weight.detach()
    codes, scales, zeros = round_to_nearest(weight, config, symmetric)
    return quantized_linear(codes, scales, zeros, config, head.bias, weight.dtype)
