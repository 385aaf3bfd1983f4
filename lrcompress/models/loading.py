"""Load a checkpoint given as a local HF directory, a .gguf file, a compressed directory or a hub id."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.reader import load_compressed
from ..errors import LrcompressError
from .gguf import converted_gguf_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str          # what the user named
    local_dir: Path | None


def resolve_model_dir(source: str) -> Path | None:
    """A local directory holding the model, converting a .gguf file once; None means "try the hub"."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LrcompressError(f"model not found: {path} (no such .gguf file)")
        return converted_gguf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LrcompressError(f"model directory {path} has no config.json")
        return path
    if path.exists():
        raise LrcompressError(f"model path {path} is neither a directory nor a .gguf file")
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_local:
        raise LrcompressError(f"model not found: {path} (no such directory or file)")
    return None


def is_compressed_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "lrcompress" in json.loads(config.read_text())


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """Load a dense or compressed model and its tokenizer on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_model_dir(source)
    if local is not None and is_compressed_dir(local):
        model = load_compressed(local, dtype=DTYPES[dtype])
    else:
        where = str(local) if local is not None else source
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code)
        except OSError as error:
            raise LrcompressError(f"could not load model {source!r}: {error}") from None
    where = str(local) if local is not None else source
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    model.eval()
    return LoadedModel(model, tokenizer, source, local)
