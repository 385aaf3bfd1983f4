"""Swapping one submodule for another by its dotted name.

It lives beside the modules it swaps in because every layer above uses it: the pipeline (replacing
targets), the checkpoint reader and exports, and lazy layer loading.
"""
from __future__ import annotations

from torch import nn


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set ``root``'s submodule at dotted ``name`` to ``new`` (its parent must exist)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
