"""What identifies a model's files, for every fingerprint that must change when the model does: the
resume fingerprint of a staged run (``pipeline.resume``) and the dense-baseline cache
(``eval.baseline_cache``) use this one rule.

A local file (a .gguf) or each file of a local directory is fingerprinted by what it holds: small
metadata files (config, tokenizer, chat template) by the sha256 of their content, weight files by the
sha256 of their name, size and first and last MiB (cheap for gigabytes, and it changes when the weights
do; a copy or a ``touch`` keeps it). Other files (README, licence) are left out. A model the hub loads
by id is its id.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import LrcompressError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
SMALL_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model")
EDGE_BYTES = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a weight file's name, size, first MiB and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}|{size}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        if size > 2 * EDGE_BYTES:
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def _file_identity(path: Path) -> str:
    if path.suffix in SMALL_FILE_SUFFIXES:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return file_digest(path)


def model_identity(source: str | Path) -> dict[str, Any]:
    """{file name: digest} for a local model file or directory, {"hub_id": source} otherwise."""
    path = Path(source).expanduser()
    if path.is_file():
        return {path.name: _file_identity(path)}
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix in SMALL_FILE_SUFFIXES))
        if not any(p.suffix in WEIGHT_SUFFIXES or p.name == "config.json" for p in files):
            raise LrcompressError(f"{path}: no config.json or weight files to fingerprint")
        return {p.name: _file_identity(p) for p in files}
    return {"hub_id": str(source)}
