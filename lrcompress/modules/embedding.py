"""QuantizedEmbedding: a token embedding stored as packed integer codes, and the LM head tied to it.

The layout is ``QuantizedLinear``'s with the vocabulary as the output dimension: codes of the V × d table
row-major, packed (``core/packing.py``), one scale (raw float bits) and one uint8 zero point per group of
``group_size`` consecutive features of a row. A tied LM head (``tie_word_embeddings``: logits = h·Eᵀ) is a
``TiedQuantizedHead``, a ``QuantizedLinear`` whose buffers *are* the embedding's tensors: the checkpoint
stores them once (the writer's aliases) and the model holds them once.

A lookup dequantizes only the rows it reads (the table is never rebuilt): a row of d codes starts on a
byte boundary whenever the codes are 8-bit or d is a multiple of 8 (the packing puts 8 codes in ``bits``
bytes); other shapes dequantize the table. ``embed_scale`` reproduces families that scale the looked-up
rows (Gemma: √d, rounded to the model's dtype as transformers does).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.packing import dequantize, packed_bytes
from .base import CompressedModule, register_module_kind
from .quantized import SCALE_FORMATS, QuantizedLinear, register_codes


@register_module_kind
class QuantizedEmbedding(CompressedModule):
    """E[v, j] = (q[v, j] − z[v, g(j)]) · s[v, g(j)] (× ``embed_scale`` on lookup)."""

    kind = "quantized_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 scale_dtype: str = "float16", embed_scale: float = 1.0, symmetric: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.scale_dtype = bits, min(group_size, embedding_dim), scale_dtype
        self.embed_scale, self.symmetric = float(embed_scale), symmetric
        self.dtype = dtype or torch.get_default_dtype()
        register_codes(self, num_embeddings, embedding_dim, device)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, settings: dict[str, Any],
                   dtype: torch.dtype) -> "QuantizedEmbedding":
        """From codes (V × d), scales and zeros (V × groups); ``settings``: bits, group_size, scale_dtype,
        embed_scale, symmetric. The scales must already be representable in ``scale_dtype``."""
        module = cls(*codes.shape, dtype=dtype, device=codes.device, **settings)
        carrier = QuantizedLinear.from_codes(codes, scales, zeros, module.bits, module.group_size,
                                             module.scale_dtype, None, dtype)
        with torch.no_grad():
            for name in ("qweight", "scales", "zeros"):
                getattr(module, name).copy_(getattr(carrier, name))
        return module

    def scale_values(self) -> torch.Tensor:
        return self.scales.view(SCALE_FORMATS[self.scale_dtype][0])

    def dense_weight(self) -> torch.Tensor:
        """The dequantized table (V × d), without ``embed_scale`` (what a tied head multiplies by)."""
        return dequantize(self.qweight, self.scale_values(), self.zeros, self.bits, self.group_size, None,
                          self.embedding_dim).to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` (a 1-D index tensor), float32, without ``embed_scale``."""
        if self.bits != 8 and self.embedding_dim % 8:
            return self.dense_weight().to(torch.float32)[ids]
        width = packed_bytes(self.embedding_dim, self.bits)
        packed = self.qweight.view(self.num_embeddings, width)[ids]
        return dequantize(packed.reshape(-1), self.scale_values()[ids], self.zeros[ids], self.bits, self.group_size,
                          None, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        found = self.rows(input_ids.reshape(-1).to(self.qweight.device)).to(self.dtype)
        if self.embed_scale != 1.0:
            found = found * torch.tensor(self.embed_scale, dtype=self.dtype, device=found.device)
        return found.view(*input_ids.shape, self.embedding_dim)

    def stored_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "bits": self.bits, "group_size": self.group_size, "scale_dtype": self.scale_dtype,
                "embed_scale": self.embed_scale, "symmetric": self.symmetric}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "QuantizedEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec["group_size"],
                   spec["scale_dtype"], spec["embed_scale"], spec["symmetric"], dtype=dtype)

    @classmethod
    def describe_shape(cls, spec: dict[str, Any]) -> str:
        return f"{spec['num_embeddings']}×{spec['embedding_dim']}"

    def to_dense(self) -> nn.Module:
        """An ``nn.Embedding`` of the dequantized table; with an ``embed_scale`` one that multiplies as the
        family's own embedding does (``ScaledEmbedding``)."""
        dense = ScaledEmbedding(self.num_embeddings, self.embedding_dim, self.embed_scale,
                                dtype=self.dtype, device=self.qweight.device)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
        return dense

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
                + (", symmetric" if self.symmetric else "") + (f", embed_scale={self.embed_scale:g}"
                                                               if self.embed_scale != 1.0 else ""))


class ScaledEmbedding(nn.Embedding):
    """``nn.Embedding`` whose lookups are multiplied by ``embed_scale`` in the weight's dtype (1: plain)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.embed_scale = float(embed_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        found = super().forward(input_ids)
        return found if self.embed_scale == 1.0 else found * torch.tensor(self.embed_scale, dtype=found.dtype)


@register_module_kind
class TiedQuantizedHead(QuantizedLinear):
    """The LM head of a tied model: logits = h·Êᵀ with the embedding's own codes, scales and zero points
    (its buffers are the embedding's tensors; ``tie`` binds them). It stores nothing of its own: the bytes
    and values are the embedding's."""

    kind = "quantized_tied_head"

    @classmethod
    def tie(cls, embedding: QuantizedEmbedding) -> "TiedQuantizedHead":
        head = cls(embedding.embedding_dim, embedding.num_embeddings, embedding.bits, embedding.group_size,
                   embedding.scale_dtype, dtype=embedding.dtype, device="meta")
        for name in ("qweight", "scales", "zeros"):
            setattr(head, name, getattr(embedding, name))
        return head

    def stored_params(self) -> int:
        return 0

    def storage_bytes(self) -> int:
        return 0


def untie(model: nn.Module, names: list[str]) -> None:
    """Drop transformers' tying of the parameters under ``names`` (modules replaced by compressed ones that
    share their tensors themselves): ``tie_weights`` would otherwise look for a ``weight`` they do not have."""
    def kept(mapping: Any) -> Any:
        if not isinstance(mapping, dict):
            return mapping
        return {target: source for target, source in mapping.items()
                if not any(key.startswith(name + ".") for key in (target, source) for name in names)}

    for module in model.modules():
        if hasattr(module, "all_tied_weights_keys"):
            module.all_tied_weights_keys = kept(module.all_tied_weights_keys)
        if isinstance(getattr(module, "_tied_weights_keys", None), dict):
            module._tied_weights_keys = kept(module._tied_weights_keys)


def retie(model: nn.Module) -> None:
    """Undo :func:`untie` once the modules are plain again (the dense export): transformers' own tying
    mapping is back, and ``tie_weights`` makes a tied head the embedding's tensor again."""
    for module in model.modules():
        module.__dict__.pop("_tied_weights_keys", None)
        if hasattr(module, "get_expanded_tied_weights_keys"):
            module.all_tied_weights_keys = module.get_expanded_tied_weights_keys(all_submodels=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
