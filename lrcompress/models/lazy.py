"""Lazy, per-layer weights (``runtime.lazy``): a model skeleton on the meta device whose decoder layers
get their tensors from the safetensors shards only while the pipeline works on them.

The engine talks to a ``LayerStore`` (load the original weights of some layers, release them); the
default mode's store does nothing because every layer is already in memory. Only the tensors outside
the decoder layers (embeddings, final norm, LM head, rotary buffers) are materialized up front, so
host memory holds one segment of layers at a time instead of the model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..checkpoint.reader import assign_tensors
from ..checkpoint.shards import ShardIndex
from ..errors import LrcompressError
from .adapters import ArchitectureAdapter, adapter_for
from .loading import DTYPES, LoadedModel, is_compressed_dir, resolve_model_dir

# one routed expert's projection stored as its own tensor (Qwen2/3-MoE, DeepSeek: gate/up/down_proj; Mixtral:
# w1 = gate, w3 = up, w2 = down, under block_sparse_moe)
PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
EXPERT_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


class LayerStore(Protocol):
    """Where the engine gets a decoder layer's original weights and gives them back."""

    def load(self, indices: list[int]) -> None: ...

    def release(self, indices: list[int]) -> None: ...


class ResidentLayers:
    """The default mode: the whole model is in memory, so loading and releasing cost nothing."""

    def load(self, indices: list[int]) -> None:
        pass

    def release(self, indices: list[int]) -> None:
        pass


class LazyLayers:
    """Materialize decoder layers of ``model`` from the checkpoint in ``directory``; release them to meta.

    ``aliases`` ({alias: stored name}, a compressed checkpoint's "tied" list) covers tensors stored once
    for several modules, such as a dictionary shared by a group of layers."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, directory: Path,
                 aliases: dict[str, str] | None = None) -> None:
        self.model, self.adapter = model, adapter
        self.index = ShardIndex(directory)
        self.aliases = aliases or {}

    def load(self, indices: list[int]) -> None:
        for i in indices:
            prefix = self.adapter.layer_prefix(i)
            keys = self.index.keys_under(prefix)
            if not keys:
                raise LrcompressError(f"{self.index.directory}: no tensors under {prefix}. (lazy loading reads the "
                                      "checkpoint's own tensor names; use runtime.lazy: false for checkpoints "
                                      "that transformers converts while loading)")
            expected = {f"{prefix}.{name}" for name in self.model.get_submodule(prefix).state_dict()}
            tensors = fuse_expert_tensors(self.index.read(keys), expected)
            assign_tensors(self.model, prefix, tensors, self.aliases, self.index.directory)
            _check_materialized(self.model.get_submodule(prefix), prefix)

    def release(self, indices: list[int]) -> None:
        layers = self.adapter.decoder_layers(self.model)
        for i in indices:
            layers[i].to(torch.device("meta"))


def fuse_expert_tensors(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """A checkpoint that stores every routed expert's projections as separate tensors (how transformers ≥ 5
    itself saves Qwen3-MoE, and the hub's Qwen/Mixtral/DeepSeek files) for a model that holds them fused
    (``experts.gate_up_proj`` E × 2I × hidden, ``experts.down_proj`` E × hidden × I): stack them as
    transformers' loading does (``conversion_mapping``: MergeModulelist(dim=0), then Concatenate(dim=1) of
    gate and up), and rename Mixtral's ``block_sparse_moe`` to ``mlp``; only where the fused or renamed name
    is one the model ``expected`` and the stored one is not. Lazy mode reads the checkpoint's own names, so
    without this it would find none of the experts."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        renamed = name.replace(".block_sparse_moe.", ".mlp.")
        renamed = renamed if renamed != name and name not in expected else name
        match = PER_EXPERT.match(renamed)
        if match is None or renamed in expected or f"{match['block']}.experts.down_proj" not in expected:
            out[renamed] = tensor
            continue
        roles = experts.setdefault(match["block"], {})
        roles.setdefault(EXPERT_ROLE[match["proj"]], {})[int(match["expert"])] = tensor
    for block, roles in experts.items():
        stacked = {role: torch.stack([by[e] for e in sorted(by)]) for role, by in roles.items()}
        counts = {role: len(t) for role, t in stacked.items()}
        if set(counts) != {"gate", "up", "down"} or len(set(counts.values())) != 1:
            raise LrcompressError(f"{block}.experts: the checkpoint's per-expert tensors are incomplete "
                                  f"(experts per projection: {counts})")
        out[f"{block}.experts.gate_up_proj"] = torch.cat([stacked["gate"], stacked["up"]], dim=1)
        out[f"{block}.experts.down_proj"] = stacked["down"]
    return out


def _check_materialized(module: nn.Module, where: str) -> None:
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise LrcompressError(f"{where}: no weights for {left[:5]} after loading (lazy mode cannot rebuild "
                              "non-persistent buffers inside decoder layers; use runtime.lazy: false)")


def lazy_model_dir(source: str) -> Path:
    """The local safetensors directory lazy mode reads (a .gguf is converted and cached once, a hub id
    is resolved to its downloaded snapshot)."""
    local = resolve_model_dir(source)
    if local is None:
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as error:  # noqa: BLE001 - any hub failure becomes one clear message
            raise LrcompressError(f"runtime.lazy: could not resolve {source!r} to a local directory: {error}") from None
    if is_compressed_dir(local):
        raise LrcompressError(f"runtime.lazy: {local} is an lrcompress checkpoint; lazy mode compresses dense "
                              "safetensors checkpoints")
    if not any(local.glob("*.safetensors")):
        raise LrcompressError(f"runtime.lazy needs a safetensors checkpoint and {local} has no *.safetensors "
                              "file (convert it, or use runtime.lazy: false)")
    return local


def build_lazy_skeleton(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model on the meta device, with only the tensors outside the decoder layers read from disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = adapter_for(model)
    index = ShardIndex(directory)
    outer = [name for name in model.state_dict() if not name.startswith(adapter.layers + ".")]
    tensors = index.read([name for name in outer if name in index.weight_map])
    current = model.state_dict(keep_vars=True)
    model.load_state_dict({name: t.to(current[name].dtype) for name, t in tensors.items()}, strict=False,
                          assign=True)
    model.tie_weights()
    _compute_buffers(model, adapter.layers + ".")
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not name.startswith(adapter.layers + ".")]
    if left:
        raise LrcompressError(f"{directory}: tensors outside the decoder layers not found: {left[:5]}")
    return model.eval()


def _compute_buffers(model: nn.Module, layers_prefix: str) -> None:
    """Fill the non-persistent buffers outside the decoder layers (rotary frequencies, Gemma's embedding
    scale, ...), which no checkpoint stores: allocate them on the CPU and let the model's own
    ``_init_weights`` compute them. Tensors already read from disk are flagged as initialized, which
    transformers' init functions respect, so they are never overwritten."""
    for name, module in model.named_modules():
        if (name + ".").startswith(layers_prefix):
            continue
        pending = [key for key, buffer in module.named_buffers(recurse=False) if buffer.is_meta]
        if not pending:
            continue
        loaded = [t for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)] if not t.is_meta]
        for key in pending:
            buffer = getattr(module, key)
            module.register_buffer(key, torch.empty_like(buffer, device="cpu"),
                                   persistent=key not in module._non_persistent_buffers_set)
        for tensor in loaded:
            tensor._is_hf_initialized = True
        try:
            model._init_weights(module)
        finally:
            for tensor in loaded:
                del tensor._is_hf_initialized


def load_lazy(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """The meta skeleton of ``source`` and its tokenizer; pair it with ``LazyLayers(model, ..., local_dir)``."""
    from transformers import AutoTokenizer

    local = lazy_model_dir(source)
    model = build_lazy_skeleton(local, DTYPES[dtype], trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, source, local)
