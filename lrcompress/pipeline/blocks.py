"""Block-level stages in the layer-wise pipeline: targets, coverage, compression and records.

A stage whose compressor is a ``BlockCompressor`` targets blocks (located through the block kind's
registry in ``models.blocks``) instead of Linears. Its statistics are collected by the engine's usual
forward hook, placed on the block. The block's relative output error is measured on a uniform sample
of its calibration inputs: ‖f'(X) − f(X)‖_F / ‖f(X)‖_F, f the block before, f' the replacement.
The config settings a replacement implies are applied to the model config, and every block of the
model must be a target of a stage that changes the config (a checkpoint has one config).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from ..compressor import Statistic
from ..compressor.block import INPUT_SAMPLE, BlockCompressor, BlockResult, InputSample
from ..errors import LrcompressError, NumericalError
from ..models import ArchitectureAdapter
from ..models.blocks import block_kind
from ..modules import storage_bytes, stored_params
from .records import ModuleRecord
from ..modules.surgery import replace_submodule
from .targets import _matches


def is_block_stage(stage: Any) -> bool:
    return isinstance(stage.compressor, BlockCompressor)


def block_needs(compressor: BlockCompressor) -> frozenset[str]:
    return compressor.needs | {INPUT_SAMPLE}


def select_blocks(layer: nn.Module, prefix: str, stage: Any) -> list[str]:
    """Names (relative to ``layer``) of the stage's blocks in this layer, filtered by its patterns."""
    names = block_kind(stage.compressor.block_kind).locate(layer)
    selected = []
    for name in names:
        full = f"{prefix}.{name}"
        if any(_matches(full, p) for p in stage.targets) and not any(_matches(full, p) for p in stage.ignore):
            selected.append(name)
    return selected


def check_coverage(model: nn.Module, adapter: ArchitectureAdapter, stages: list[Any]) -> None:
    """Before any work: a stage that changes the config must target every block of its kind."""
    for stage in stages:
        if not is_block_stage(stage) or not stage.compressor.uniform:
            continue
        locate = block_kind(stage.compressor.block_kind).locate
        missed, found = [], 0
        for index, layer in enumerate(adapter.decoder_layers(model)):
            prefix = adapter.layer_prefix(index)
            chosen = set(select_blocks(layer, prefix, stage))
            for name in locate(layer):
                found += 1
                if name not in chosen:
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


def compress_block(model: nn.Module, layer_index: int, layer: nn.Module, prefix: str, name: str, stage: Any,
                   stats: dict[str, Statistic], compute: torch.device, applied: dict[str, tuple]) -> ModuleRecord:
    """Compress one block, swap the replacement in, update the config, return its record."""
    full_name = f"{prefix}.{name}"
    block = layer.get_submodule(name)
    compressor: BlockCompressor = stage.compressor
    started = time.perf_counter()
    result = compressor.compress(full_name, block, stats)
    seconds = time.perf_counter() - started
    if not isinstance(result, BlockResult):
        raise TypeError(f"{compressor.name} returned {type(result).__name__}, not a BlockResult")
    replacement = result.module.to(compute)
    sample = stats[INPUT_SAMPLE]
    assert isinstance(sample, InputSample)
    error = output_error(block, replacement, sample.sample(), full_name)
    replace_submodule(layer, name, replacement)
    apply_config_updates(model, compressor.block_kind, result.config_updates, applied, full_name)
    hidden = sample.sample().shape[-1]
    return ModuleRecord(
        name=full_name, layer=layer_index, stage=stage.index, method=compressor.name,
        in_features=hidden, out_features=hidden,
        params_before=stored_params(block), params_after=stored_params(replacement),
        rank=result.rank, relative_error=error, numerical_path=result.numerical_path,
        seconds=seconds, details={**result.details, "config_updates": result.config_updates},
        bytes_before=storage_bytes(block), bytes_after=storage_bytes(replacement),
    )
