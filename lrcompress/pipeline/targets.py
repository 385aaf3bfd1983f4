"""Which modules of a decoder layer a stage compresses: glob (or ``re:``) patterns over full names."""
from __future__ import annotations

import fnmatch
import re

from torch import nn

from ..modules import CompressedLinear


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, CompressedLinear))


def select_targets(layer: nn.Module, prefix: str, targets: list[str], ignore: list[str]) -> list[str]:
    """Names (relative to ``layer``) of its linear modules matched by ``targets`` and not ``ignore``.

    Patterns see the full dotted name from the model root, e.g. ``model.layers.3.mlp.down_proj``.
    Submodules of an already compressed module (its factor linears) are never targets themselves.
    """
    selected: list[str] = []
    inside_compressed: list[str] = []
    for name, module in layer.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside_compressed):
            continue
        if isinstance(module, CompressedLinear):
            inside_compressed.append(name)
        if not is_linear_like(module):
            continue
        full = f"{prefix}.{name}"
        if any(_matches(full, p) for p in targets) and not any(_matches(full, p) for p in ignore):
            selected.append(name)
    return selected
