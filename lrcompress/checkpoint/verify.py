"""Check a directory of safetensors files before anything is loaded from it.

A checkpoint may come from anywhere: a copy cut short, a shard index that does not match its shards,
a tensor of another shape than the model has. safetensors and transformers find such problems deep
inside a load, with a stack trace; these checks read the headers only (kilobytes) and name the file
and the tensor. Nothing here executes code from the checkpoint: safetensors holds raw bytes and JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import CheckpointError, LrcompressError
from .shards import INDEX_NAME, read_header


def _data_end(header: dict) -> int:
    ends = [entry.get("data_offsets", [0, 0])[1] for entry in header.values() if isinstance(entry, dict)]
    return max(ends, default=0)


def shard_headers(directory: Path) -> dict[str, dict]:
    """{file name: header} of every safetensors file the checkpoint uses; every file complete."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map): "
                                  f"{error}") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, sorted(p.name for p in directory.glob("*.safetensors"))
    headers: dict[str, dict] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{index} names {name}, which is not in {directory}")
        try:
            header, start = read_header(path)
        except LrcompressError as error:
            raise CheckpointError(str(error)) from None
        size = path.stat().st_size
        if start + _data_end(header) > size:
            raise CheckpointError(f"{path}: truncated safetensors file: its tensors need "
                                  f"{start + _data_end(header)} bytes and the file holds {size}; copy it again")
        headers[name] = header
    for tensor, name in (weight_map or {}).items():
        if tensor not in headers[name]:
            raise CheckpointError(f"{index} places {tensor} in {name}, which has no such tensor")
    return headers


def verify_safetensors_dir(directory: Path, expected: Mapping[str, Sequence[int]] | None = None) -> None:
    """Every shard complete and consistent with the index; with ``expected`` ({tensor: shape}, e.g. the
    model skeleton's), every tensor present in both has the shape the model expects."""
    for name, header in shard_headers(directory).items():
        if expected is None:
            continue
        for tensor, entry in header.items():
            want = expected.get(tensor)
            if want is not None and list(entry.get("shape", [])) != list(want):
                raise CheckpointError(f"{Path(directory) / name}: tensor {tensor} has shape {entry.get('shape')}, "
                                      f"the model built from config.json expects {list(want)}; the checkpoint "
                                      "does not match its config")
