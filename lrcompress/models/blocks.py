"""Kinds of blocks that block-level compressors target, and how the architecture names their settings.

A kind says where its blocks are in a decoder layer and translates the symbolic config settings a
compressor reports (e.g. ``num_experts``) into the attribute of this model's config that holds them
(``num_local_experts`` for Mixtral, ``n_routed_experts`` for DeepSeek, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import LrcompressError
from . import moe


@dataclass(frozen=True)
class BlockKind:
    locate: Callable[[nn.Module], list[str]]          # decoder layer -> names of its blocks of this kind
    config_key: Callable[[Any, str], str]             # (model config, symbolic setting) -> attribute


def _moe_config_key(config: Any, setting: str) -> str:
    if setting != "num_experts":
        raise LrcompressError(f"MoE blocks have no config setting {setting!r}")
    return moe.expert_count_key(config)


BLOCK_KINDS: dict[str, BlockKind] = {
    "moe": BlockKind(moe.moe_blocks, _moe_config_key),
}


def block_kind(name: str) -> BlockKind:
    try:
        return BLOCK_KINDS[name]
    except KeyError:
        raise LrcompressError(f"unknown block kind {name!r}; known: {sorted(BLOCK_KINDS)}") from None
