"""Architecture adapters: where the decoder layers and the modules around them live.

The pipeline asks the adapter, never the module names. Adapters are found from the model's structure,
so a causal LM that transformers builds the usual way works without being named anywhere:

* decoder layers: the ``nn.ModuleList`` under the base model (``model.base_model``) whose length is
  ``config.num_hidden_layers`` (the shallowest such list; ``layers`` wins a tie);
* embeddings and LM head: ``get_input_embeddings()`` / ``get_output_embeddings()``;
* final norm: the base model's child module called (or whose class is called) a norm;
* rotary module: the base model's child whose class is a rotary embedding or that holds an
  ``inv_freq`` buffer (absent for models without rotary positions).

What differs between layers (``config.layer_types``: sliding vs full attention, rotary base per type)
needs no adapter field: ``models.capture`` records what the model's own forward passes every layer.
Models this cannot read register their paths explicitly (``register_adapter``); ``ADAPTERS`` is that
table of exceptions, consulted first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LrcompressError

NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Paths (dotted attribute names from the CausalLM root) of the parts the pipeline needs."""

    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    lm_head: str = "lm_head"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def outer_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules the model's forward runs before the first decoder layer (needed on the compute
        device to capture): the embeddings and every other child of the module holding the decoder
        layers, except the layers and the final norm."""
        parent, _, _ = self.layers.rpartition(".")
        base = model.get_submodule(parent) if parent else model
        skip = {id(self.decoder_layers(model)), id(model.get_submodule(self.final_norm))}
        modules = [model.get_submodule(self.embed)]
        modules += [child for child in base.children() if id(child) not in skip and child not in modules]
        return modules

    def head_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the model computes from the last decoder layer's output: final norm, LM head and
        the head settings of the config (Granite's ``logits_scaling``, Cohere's ``logit_scale``,
        Gemma 2/3's ``final_logit_softcapping``)."""
        logits = model.get_submodule(self.lm_head)(model.get_submodule(self.final_norm)(hidden))
        config = model.config
        if getattr(config, "logits_scaling", None):
            logits = logits / config.logits_scaling
        if getattr(config, "logit_scale", None):
            logits = logits * config.logit_scale
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


# Explicit adapters for architectures whose structure is not recognised (see ``register_adapter``).
ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(model_type: str, *, layers: str, embed: str, final_norm: str, lm_head: str,
                     rotary: str | None = None) -> ArchitectureAdapter:
    """Name the parts of an architecture (``config.model_type``) that structural discovery cannot find,
    as dotted paths from the CausalLM root; returns the registered adapter."""
    adapter = ArchitectureAdapter(model_type, layers, embed, final_norm, rotary, lm_head)
    ADAPTERS[model_type] = adapter
    return adapter


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The registered adapter of the model's ``model_type``, else one found from its structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type) or discover(model)
    try:
        adapter.decoder_layers(model)
        for path in (adapter.embed, adapter.final_norm, adapter.lm_head, *([adapter.rotary] if adapter.rotary else [])):
            model.get_submodule(path)
    except AttributeError as error:
        raise LrcompressError(f"{model_type}: the adapter's paths do not match the model: {error}") from None
    return adapter


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, candidate in model.named_modules() if candidate is module and name), None)


def _layer_count(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_layers(base: nn.Module, count: int | None) -> tuple[str | None, list[str]]:
    """(path under ``base`` of the decoder-layer list or None, every ModuleList seen as "path[len]")."""
    lists = [(name, module) for name, module in base.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0 and name]
    seen = [f"{name}[{len(module)}]" for name, module in lists]
    fits = [(name.count("."), not name.endswith("layers"), name) for name, module in lists
            if count is None or len(module) == count]
    return (min(fits)[2] if fits else None), seen


def _child_name(base: nn.Module, wanted) -> str | None:
    return next((name for name, child in base.named_children() if wanted(name, child)), None)


def _final_norm(base: nn.Module) -> str | None:
    """A child named like a final norm, else the last child whose class is a norm."""
    norms = [name for name, child in base.named_children() if "norm" in type(child).__name__.lower()]
    named = [name for name in norms if name in NORM_NAMES]
    return (named or norms or [None])[0 if named else -1]


def _is_rotary(_name: str, module: nn.Module) -> bool:
    return ("rotary" in type(module).__name__.lower()
            or any(buffer.endswith("inv_freq") for buffer, _ in module.named_buffers(recurse=False)))


def discover(model: nn.Module) -> ArchitectureAdapter:
    """An adapter read from the model's structure and config (see the module docstring)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base = getattr(model, "base_model", model)
    base_path = _name_of(model, base) if base is not model else ""
    count = _layer_count(config)
    layers, lists = _find_layers(base, count)
    embed = _name_of(model, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    head = _name_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    norm = _final_norm(base)
    rotary = _child_name(base, _is_rotary)
    found = {"decoder layers": layers, "embeddings": embed, "LM head": head, "final norm": norm}
    missing = [part for part, path in found.items() if path is None]
    if missing:
        prefix = f"{base_path}." if base_path else ""
        raise LrcompressError(
            f"architecture {model_type!r} ({type(model).__name__}) is not recognised: no {', '.join(missing)} found. "
            f"Looked for: decoder layers = an nn.ModuleList of config.num_hidden_layers={count} modules under "
            f"the base model {type(base).__name__} (ModuleLists there: {', '.join(lists) or 'none'}); "
            "embeddings / LM head = get_input_embeddings() / get_output_embeddings(); final norm = a child of "
            f"the base model named one of {NORM_NAMES} or whose class name contains 'Norm' "
            f"(children: {', '.join(name for name, _ in base.named_children())}). "
            "Register the paths with lrcompress.models.register_adapter("
            f"{model_type!r}, layers=..., embed=..., final_norm=..., lm_head=..., rotary=...) "
            f"(e.g. layers='{prefix}layers')")
    join = (lambda name: f"{base_path}.{name}") if base_path else (lambda name: name)
    return ArchitectureAdapter(family=model_type or type(model).__name__, layers=join(layers), embed=embed,
                               final_norm=join(norm), rotary=join(rotary) if rotary else None, lm_head=head)
