"""Export a compressed model as a plain dense Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..modules import QuantizedEmbedding, compressed_modules, retie
from ..modules.surgery import replace_submodule
from .layout import GUARD_KEY, METADATA_KEY, QUANT_METHOD, QUANTIZATION_KEY, staged_directory


def densify(model: nn.Module) -> nn.Module:
    """Replace every compressed module by its plain equivalent (an nn.Linear, fused experts), in place,
    and drop what marks the model as an lrcompress checkpoint (so that it saves as a plain one)."""
    replaced = compressed_modules(model)
    for name, module in replaced:
        replace_submodule(model, name, module.to_dense())
    if any(isinstance(module, QuantizedEmbedding) for _, module in replaced):
        retie(model)            # a tied head is the (now dense) embedding's tensor again
    forget_compression(model)
    return model


def forget_compression(model: nn.Module) -> None:
    """Remove the lrcompress block, guard and transformers quantizer from a (densified) model."""
    config = model.config
    quantization = getattr(config, QUANTIZATION_KEY, None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    if method == QUANT_METHOD:
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        elif hasattr(config, QUANTIZATION_KEY):
            delattr(config, QUANTIZATION_KEY)
    for key in (METADATA_KEY, GUARD_KEY):
        if hasattr(config, key):
            delattr(config, key)


def export_dense(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False) -> None:
    densify(model)
    with staged_directory(out_dir, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
