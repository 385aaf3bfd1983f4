"""Export a compressed model as a plain dense Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..modules import compressed_modules
from ..modules.surgery import replace_submodule
from .layout import staged_directory


def densify(model: nn.Module) -> nn.Module:
    """Replace every compressed module by its plain equivalent (an nn.Linear, fused experts), in place."""
    for name, module in compressed_modules(model):
        replace_submodule(model, name, module.to_dense())
    return model


def export_dense(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False) -> None:
    densify(model)
    if hasattr(model.config, "lrcompress"):
        del model.config.lrcompress
    with staged_directory(out_dir, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
