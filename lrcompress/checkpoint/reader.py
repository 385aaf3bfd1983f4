"""Rebuild a compressed model: the architecture from config.json, the compressed modules from their
specs, then the tensors from safetensors (never pickle)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError
from ..modules import MODULE_KINDS, prepare_for_inference, untie
from ..modules.surgery import replace_submodule
from .layout import (CONFIG_NAME, FORMAT_VERSION, GUARD_KEY, METADATA_KEY, QUANTIZATION_KEY, lrcompress_block,
                     weight_files)
from .verify import verify_safetensors_dir


def read_metadata(directory: Path) -> tuple[dict, dict]:
    """(config without the lrcompress block, the block); raises if the directory is not a checkpoint."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable JSON config: {error}") from None
    meta = lrcompress_block(config) if isinstance(config, dict) else None
    if meta is None:
        raise CheckpointError(f"{path} has no lrcompress {QUANTIZATION_KEY}: not an lrcompress checkpoint")
    for key in (QUANTIZATION_KEY, METADATA_KEY, GUARD_KEY):
        config.pop(key, None)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not supported "
                              f"(this lrcompress reads version {FORMAT_VERSION})")
    return config, meta


def build_skeleton(config_dict: dict, meta: dict, dtype: torch.dtype, source: str | Path = CONFIG_NAME) -> nn.Module:
    """The model with random-free (uninitialized) weights and the compressed modules swapped in."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{source}: transformers cannot build model_type {model_type!r}: {first}") from None
    for name, spec in meta.get("modules", {}).items():
        kind = MODULE_KINDS.get(spec.get("kind")) if isinstance(spec, dict) else None
        if kind is None:
            shown = spec.get("kind") if isinstance(spec, dict) else spec
            raise CheckpointError(f"{source}, lrcompress block: module {name}: unknown compressed kind {shown!r} "
                                  f"(this lrcompress knows {', '.join(sorted(MODULE_KINDS))}); the checkpoint was "
                                  "written by a newer lrcompress, or it is damaged")
        try:
            replace_submodule(model, name, kind.from_spec(spec, dtype))
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}, lrcompress block: module {name}: invalid {spec['kind']} spec "
                                  f"({type(error).__name__}: {error})") from None
    untie(model, list(meta.get("modules", {})))      # a quantized embedding and head share their tensors themselves
    return model


def restore_aliases(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias the very tensor it was stored as (tied embeddings, shared dictionaries)."""
    for alias, source in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        source_owner, _, source_attr = source.rpartition(".")
        owner = model.get_submodule(owner_name)
        shared = getattr(model.get_submodule(source_owner), source_attr)
        if getattr(owner, attr) is not shared:
            setattr(owner, attr, shared)


def assign_tensors(model: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                   where: str | Path) -> None:
    """Put ``tensors`` (full names under ``prefix``) into ``model.get_submodule(prefix)`` by assignment, so
    that a module on the meta device gets real tensors without a copy; floating tensors take the dtype
    the module already has. Every tensor of the submodule must be given, except the aliases, which
    are then re-pointed at their stored tensor."""
    module = model.get_submodule(prefix) if prefix else model
    strip = len(prefix) + 1 if prefix else 0
    current = module.state_dict(keep_vars=True)
    local: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = name[strip:]
        target = current.get(key)
        if target is not None and target.shape != tensor.shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {list(tensor.shape)}, the model expects "
                                  f"{list(target.shape)}; the checkpoint does not match its config")
        local[key] = tensor.to(target.dtype) if target is not None and target.is_floating_point() else tensor
    missing, unexpected = module.load_state_dict(local, strict=False, assign=True)
    inside = {alias: source for alias, source in aliases.items() if not prefix or alias.startswith(prefix + ".")}
    missing = [name for name in missing if (prefix + "." + name if prefix else name) not in inside]
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match {prefix or 'the model'} "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    restore_aliases(model, inside)


def _verify_files(directory: Path, model: nn.Module) -> list[Path]:
    """The weight files, each complete and holding tensors of the shapes ``model`` (the skeleton the
    config builds) has; raises ``CheckpointError`` naming the file and tensor otherwise."""
    files = weight_files(directory)
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files")
    verify_safetensors_dir(directory, {name: list(t.shape) for name, t in model.state_dict().items()})
    return files


def verify_compressed(directory: str | Path) -> None:
    """The checks ``load_compressed`` makes before it reads a tensor, on a meta-device skeleton (headers
    only, no weights in memory): what ``load`` refuses, ``inspect`` refuses too."""
    directory = Path(directory)
    config_dict, meta = read_metadata(directory)
    with torch.device("meta"):
        model = build_skeleton(config_dict, meta, getattr(torch, meta.get("dtype", "float32")),
                               directory / CONFIG_NAME)
    _verify_files(directory, model)


def load_compressed(directory: str | Path, dtype: torch.dtype | None = None, kernels: bool = True) -> nn.Module:
    """The compressed model of ``directory``; with ``kernels`` its modules build their fast inference
    layouts (packed int4 CPU kernels), else they compute the exact dequantized reference."""
    directory = Path(directory)
    config_dict, meta = read_metadata(directory)
    stored_dtype = getattr(torch, meta.get("dtype", "float32"))
    model = build_skeleton(config_dict, meta, stored_dtype, directory / CONFIG_NAME)
    tensors: dict[str, torch.Tensor] = {}
    for file in _verify_files(directory, model):
        tensors.update(load_file(file))
    assign_tensors(model, "", tensors, meta.get("tied", {}), directory)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    if kernels:
        prepare_for_inference(model)
    return model.eval()
