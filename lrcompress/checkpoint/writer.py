"""Write a (compressed) model as safetensors shards + config.json with the lrcompress block."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from ..modules import compressed_modules
from .carry import write_carried_files
from .layout import (CONFIG_NAME, FORMAT_VERSION, GUARD_KEY, INDEX_NAME, LOAD_GUARD, QUANT_METHOD,
                     QUANTIZATION_KEY, WEIGHTS_NAME)

DEFAULT_SHARD_BYTES = 2 * 1024**3


def compressed_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: module.spec() for name, module in compressed_modules(model)}


def unique_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Named tensors with shared ones stored once (tied embeddings, a group's shared dictionary);
    returns them (on the CPU, contiguous) and {alias: stored name}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in named:
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with shared tensors stored once; returns it and {alias: stored name}."""
    return unique_tensors(model.state_dict(keep_vars=False).items())


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    write_index(directory, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The Hugging Face shard index: which file holds each tensor."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


def checkpoint_config(model_config: Any, dtype: torch.dtype, specs: dict[str, dict[str, Any]],
                      aliases: dict[str, str], provenance: dict[str, Any]) -> dict[str, Any]:
    """config.json's content: the model's config plus the lrcompress block the reader needs, as a
    transformers quantization_config, and the guard that makes plain transformers refuse it."""
    config = model_config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")      # what from_pretrained loads by default
    config[QUANTIZATION_KEY] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "modules": specs,
        "tied": aliases,
        "provenance": provenance,
    }
    config[GUARD_KEY] = LOAD_GUARD
    return config


def write_checkpoint(model: nn.Module, tokenizer: Any, directory: Path, provenance: dict[str, Any],
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, source: str | Path | None = None) -> None:
    """Write ``model`` (with its compressed modules) into an existing, empty ``directory``; the
    generation config and tokenizer files of ``source`` (a directory or hub id) are copied unchanged."""
    tensors, aliases = unique_state_dict(model)
    write_weights(directory, tensors, max_shard_bytes)
    config = checkpoint_config(model.config, next(model.parameters()).dtype, compressed_specs(model), aliases,
                               provenance)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    write_carried_files(directory, source, tokenizer)
