"""Load a checkpoint given as a local HF directory, a .gguf file, a compressed directory or a hub id."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.layout import lrcompress_block
from ..checkpoint.reader import build_skeleton, load_compressed, read_metadata
from ..errors import LrcompressError
from ..core.hub import hub_reachable, with_offline_reason
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
    hub_reachable()          # once, before any hub request: offline, fail at once instead of retrying
    return None


def _hub_refused(what: str, source: str, error: OSError) -> LrcompressError:
    """transformers' multi-line hub error as one line naming the model (and, offline, saying why)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return LrcompressError(with_offline_reason(f"{what} {source!r}: {first.rstrip('.')}"))


def is_compressed_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and lrcompress_block(read_config_json(path)) is not None


def load_ready(path: str | Path, dtype: torch.dtype | None = None, kernels: bool = True) -> nn.Module:
    """A checkpoint written by lrcompress (or any dense HF directory, or a hub id) as a ready model
    (``lrcompress.load``). ``kernels=False`` keeps the exact dequantized reference forward of quantized
    modules instead of the packed CPU kernels (bfloat16 activations; see ``modules/cpu_kernels.py``)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if is_compressed_dir(path):
        return load_compressed(path, dtype=dtype, kernels=kernels)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()


def read_config_json(directory: Path) -> dict:
    """A model directory's config.json as a dict; an unreadable one is one message naming the file."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LrcompressError(f"{path} is not a readable JSON config: {error}") from None
    if not isinstance(config, dict):
        raise LrcompressError(f"{path} is not a model config (a JSON object)")
    return config


def _transformers_refused(what: str, error: Exception) -> LrcompressError:
    """transformers' long errors (config or architecture it does not know) as one line naming ``what``."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return LrcompressError(f"{what}: transformers cannot build this model: {first} (check model_type; "
                           "models that ship their own code need model.trust_remote_code: true)")


def _check_model_type(path: Path, config: dict, trust_remote_code: bool) -> None:
    """The architecture a config.json names must be one transformers knows (or ship its own code)."""
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type is None:
        raise LrcompressError(f"{path} has no model_type key, so transformers cannot tell which architecture it "
                              "is; a Hugging Face causal LM's config.json names one (e.g. \"model_type\": \"llama\")")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in config):
        raise LrcompressError(f"{path}: model_type {model_type!r} is not an architecture transformers "
                              f"{transformers.__version__} knows; upgrade transformers, or set "
                              "model.trust_remote_code: true if the model ships its own code")


def load_config(source: str, local: Path | None, trust_remote_code: bool = False):
    """The transformers config of a model (local directory or hub id), without any weights."""
    from transformers import AutoConfig

    where = str(local) if local is not None else source
    what = f"{local / 'config.json'}" if local is not None else f"model {source!r}"
    if local is not None:
        _check_model_type(local / "config.json", read_config_json(local), trust_remote_code)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as error:   # a hub id that cannot be reached or does not exist
        raise _hub_refused("could not load the config of model", source, error) from None
    except (ValueError, KeyError, TypeError) as error:
        raise _transformers_refused(what, error) from None


def model_skeleton(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """The model ``source`` names, on the meta device (shapes and module names, no weights, no memory):
    enough to plan a run and check its targets before anything is loaded. A compressed checkpoint's
    skeleton has its compressed modules swapped in."""
    from transformers import AutoModelForCausalLM

    local = resolve_model_dir(source)
    if local is not None and is_compressed_dir(local):
        config_dict, meta = read_metadata(local)
        with torch.device("meta"):
            return build_skeleton(config_dict, meta, DTYPES[dtype], local / "config.json")
    config = load_config(source, local, trust_remote_code)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as error:
        raise _transformers_refused(f"{local / 'config.json'}" if local is not None else source, error) from None


def tensor_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """Load a dense or compressed model and its tokenizer on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_model_dir(source)
    if local is not None and is_compressed_dir(local):
        model = load_compressed(local, dtype=DTYPES[dtype])
    else:
        where = str(local) if local is not None else source
        if local is not None:  # an unknown config, a truncated shard, a tensor of the wrong shape: one message
            from ..checkpoint.verify import verify_safetensors_dir

            verify_safetensors_dir(local, tensor_shapes(model_skeleton(source, dtype, trust_remote_code)))
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code)
        except OSError as error:
            raise _hub_refused("could not load model", source, error) from None
        except (ValueError, KeyError) as error:
            raise _transformers_refused(where, error) from None
    where = str(local) if local is not None else source
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    model.eval()
    return LoadedModel(model, tokenizer, source, local)
