"""GGUF files: dequantize once through transformers + gguf, cache as a safetensors HF directory."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ..core.cache import cache_root

log = logging.getLogger(__name__)


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Refuse a file named .gguf that is not one (the GGUF magic is its first four bytes)."""
    from ..errors import LrcompressError

    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise LrcompressError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                              "give a GGUF file or a Hugging Face model directory")


# GGUF metadata that llama.cpp's converter writes but transformers' GGUF config mapping does not read, per
# GGUF architecture: without it the experts take the config class's default size (Qwen1.5-MoE-A2.7B's 1408,
# Qwen3-30B-A3B's 768) and every other model of the family fails to load with a shape mismatch.
UNMAPPED_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "qwen2moe": {"expert_feed_forward_length": "moe_intermediate_size",
                 "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}
MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}   # transformers' name of each architecture above


def gguf_config(path: Path):
    """transformers' config for ``path``, completed with the metadata its GGUF mapping leaves out."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if getattr(config, "model_type", None) not in MODEL_TYPES.values():
        return config       # nothing to complete: no second parse of the file (a 49k vocabulary takes seconds)
    reader = gguf.GGUFReader(str(path))
    architecture = reader.fields["general.architecture"].contents()
    for key, attribute in UNMAPPED_CONFIG_KEYS.get(architecture, {}).items():
        field = reader.fields.get(f"{architecture}.{key}")
        if field is not None:
            setattr(config, attribute, int(field.contents()))
            log.info("%s: %s = %s from GGUF metadata %s.%s", path.name, attribute, field.contents(), architecture, key)
    return config


def converted_gguf_dir(path: Path, target: Path | None = None) -> Path:
    """The cached HF directory for ``path``; converts on first use (~30 s for a 135M model)."""
    check_gguf(path)
    target = target or cache_root() / "gguf" / f"{path.stem}-{_gguf_key(path)}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint in %s (once)", path, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=gguf_config(path),
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, EOFError, RuntimeError) as error:  # damaged, unconvertible, shapes off
        from ..errors import LrcompressError

        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LrcompressError(f"{path}: transformers could not convert this GGUF file: {first}") from None
    # The weights are already dequantized to float; drop the GGUF quantizer so the model saves plainly.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target
