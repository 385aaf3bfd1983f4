"""Export a compressed model as a plain dense Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..modules import compressed_modules, to_dense_linear
from ..pipeline.targets import replace_submodule
from .layout import staged_directory


def densify(model: nn.Module) -> nn.Module:
    """Replace every compressed module by an equivalent nn.Linear, in place."""
    names = [name for name, _ in compressed_modules(model)]
    for name in names:
        replace_submodule(model, name, to_dense_linear(model.get_submodule(name)))
    return model


def export_dense(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False) -> None:
    densify(model)
    if hasattr(model.config, "lrcompress"):
        del model.config.lrcompress
    with staged_directory(out_dir, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
