"""Read some tensors of a safetensors checkpoint, and nothing else.

Why not ``safetensors.safe_open``: it maps the whole shard file into the address space (a shard is
often 5 GB), so a process under a memory limit that counts mappings (RLIMIT_DATA) fails on a shard
larger than its budget, and every touched page of the mapping shows up in the resident set. Lazy mode
wants host memory to be the tensors it asked for: this reads the file's JSON header, then exactly
each tensor's byte range into a freshly allocated tensor (``readinto``, no mapping, no extra copy).
The format is the documented one: an 8-byte little-endian header length, the JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the data, offsets relative to its start.
"""
from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..errors import LrcompressError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensors' entries of the header and the offset of the data section; a file too short for its
    header, or a header that is not the documented JSON, is refused naming the file."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise LrcompressError(f"{path}: truncated safetensors file ({size} bytes, not even a header length)")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise LrcompressError(f"{path}: truncated safetensors file: its header claims {length} bytes and the "
                                  f"file holds {size}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LrcompressError(f"{path}: damaged safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise LrcompressError(f"{path}: damaged safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    fields = {"dtype", "shape", "data_offsets"}
    bad = next((name for name, entry in header.items() if not (isinstance(entry, dict) and fields <= entry.keys())),
               None)
    if bad is not None:
        raise LrcompressError(f"{path}: damaged safetensors header (its entry {bad!r} is not a tensor's dtype, shape "
                              "and data_offsets)")
    return header, 8 + length


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """These tensors of one safetensors file, each read from its byte range."""
    header, start = read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as handle:
        for name in names:
            entry = header.get(name)
            if entry is None:
                raise LrcompressError(f"{path}: no tensor {name!r}")
            if entry["dtype"] not in DTYPES:
                raise LrcompressError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which lrcompress cannot read")
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            if handle.readinto(memoryview(raw.numpy())) != end - begin:
                raise LrcompressError(f"{path}: truncated file (tensor {name!r})")
            tensors[name] = raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors


def read_all(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, list(read_header(path)[0]))


class ShardIndex:
    """Which safetensors file of ``directory`` holds each tensor (the index's weight_map, or the one file)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_NAME).is_file():
            self.weight_map = {key: SINGLE_NAME for key in read_header(self.directory / SINGLE_NAME)[0]}
        else:
            raise LrcompressError(f"{self.directory}: no {INDEX_NAME} or {SINGLE_NAME}; lazy loading reads "
                                  "safetensors checkpoints only")

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self.weight_map if key.startswith(prefix + ".")]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.weight_map[key]].append(key)
        tensors: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            tensors.update(read_tensors(self.directory / file, names))
        return tensors
