"""Block targets in the layer-wise pipeline: selection, coverage, output error and config updates.

A stage whose compressor is a ``BlockCompressor`` targets blocks (located through the block kind's
registry in ``models.blocks``, e.g. an MoE layer) instead of Linears. Its statistics are collected by
the engine's usual forward hook, placed on the block. The block's relative output error is measured on a
uniform sample of its calibration inputs: ‖f'(X) − f(X)‖_F / ‖f(X)‖_F, f the block the stage received,
f' the replacement. The config settings a replacement implies are applied to the model config, and every
block of the model must be a target of a stage that changes the config (a checkpoint has one config).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..compressor import CompressResult, GroupMember
from ..compressor.block import INPUT_SAMPLE, BlockCompressor, BlockResult, InputSample
from ..errors import LrcompressError, NumericalError
from ..models import ArchitectureAdapter
from ..models.blocks import block_kind
from .targets import Measured, chosen


def select_blocks(layer: nn.Module, prefix: str, stage: Any) -> list[str]:
    """Names (relative to ``layer``) of the stage's blocks in this layer, filtered by its patterns."""
    names = block_kind(stage.compressor.block_kind).locate(layer)
    return [name for name in names if chosen(f"{prefix}.{name}", stage.targets, stage.ignore)]


class BlockTargets:
    """Whole blocks. Every process compresses every block (a block replacement has no spec to send, and
    its statistics, reduced, and its seeded compressor are the same on every process)."""

    distributed = False
    matches_outputs = False    # output matching leaves blocks alone (pipeline.reference)

    def select(self, layer: nn.Module, prefix: str, stage: Any) -> list[str]:
        return select_blocks(layer, prefix, stage)

    def needs(self, compressor: BlockCompressor) -> frozenset[str]:
        return compressor.needs | {INPUT_SAMPLE}

    def shape(self, module: nn.Module, config: Any) -> tuple[int, int]:
        return config.hidden_size, config.hidden_size          # a block maps hidden -> hidden

    def measure(self, member: GroupMember, original: nn.Module, replacement: nn.Module, result: CompressResult,
                method: str) -> Measured:
        if not isinstance(result, BlockResult):
            raise TypeError(f"{method} returned {type(result).__name__}, not a BlockResult")
        sample = member.stats[INPUT_SAMPLE]
        assert isinstance(sample, InputSample)
        rows = sample.sample()
        hidden = rows.shape[-1]
        return Measured(output_error(member.module, replacement, rows, member.name), hidden, hidden)

    def details(self, result: CompressResult) -> dict[str, Any]:
        assert isinstance(result, BlockResult)
        return {**result.details, "config_updates": result.config_updates}

    def update_config(self, model: nn.Module, compressor: BlockCompressor, result: CompressResult,
                      applied: dict[str, tuple], name: str) -> None:
        """The config settings the replacement implies (e.g. fewer experts), the same for every block."""
        assert isinstance(result, BlockResult)
        apply_config_updates(model, compressor.block_kind, result.config_updates, applied, name)


def is_block_stage(stage: Any) -> bool:
    """A stage whose targets are whole blocks (for messages that name what a stage looks for)."""
    return isinstance(stage.kind, BlockTargets)


def check_coverage(model: nn.Module, adapter: ArchitectureAdapter, stages: list[Any]) -> None:
    """Before any work: a stage that changes the config must target every block of its kind."""
    for stage in stages:
        if not is_block_stage(stage) or not stage.compressor.uniform:
            continue
        locate = block_kind(stage.compressor.block_kind).locate
        missed, found = [], 0
        for index, layer in enumerate(adapter.decoder_layers(model)):
            prefix = adapter.layer_prefix(index)
            selected = set(stage.select(layer, prefix))
            for name in locate(layer):
                found += 1
                if name not in selected:
                    missed.append(f"{prefix}.{name}")
        if not found:
            raise LrcompressError(f"stage {stage.index} ({stage.compressor.name}): the model has no "
                                  f"{stage.compressor.block_kind} blocks")
        if missed:
            raise LrcompressError(
                f"stage {stage.index} ({stage.compressor.name}) changes the model config, so it must target "
                f"every {stage.compressor.block_kind} block; left out: {', '.join(missed[:5])}")


def output_error(original: nn.Module, replacement: nn.Module, sample: torch.Tensor, name: str) -> float:
    """‖f'(X) − f(X)‖_F / ‖f(X)‖_F on the sampled block inputs, accumulated in float64."""
    device = next(original.parameters()).device
    dtype = next(original.parameters()).dtype
    x = sample.to(device, dtype)[None]
    before = original(x).to(torch.float64)
    after = replacement(x).to(torch.float64)
    if not torch.isfinite(after).all():
        raise NumericalError(f"{name}: the replacement block produces NaN/Inf on the calibration inputs")
    den = float(before.pow(2).sum())
    num = float((after - before).pow(2).sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


def apply_config_updates(model: nn.Module, kind: str, updates: dict[str, Any], applied: dict[str, tuple],
                         name: str) -> None:
    """Set the config attributes a replacement implies; refuse two blocks implying different values."""
    for setting, value in updates.items():
        key = block_kind(kind).config_key(model.config, setting)
        if key in applied and applied[key][0] != value:
            raise LrcompressError(f"{name} needs {key}={value} but {applied[key][1]} set {key}={applied[key][0]}: "
                                  "a checkpoint has one config for every layer")
        applied.setdefault(key, (value, name))
        setattr(model.config, key, value)
