"""Architecture adapters: where the decoder layers and the modules around them live.

The pipeline asks the adapter, never the module names, so a new architecture is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LrcompressError


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
        """Modules that run before the first decoder layer (needed on the compute device to capture)."""
        names = [self.embed] + ([self.rotary] if self.rotary else [])
        return [model.get_submodule(name) for name in names]


DENSE_DECODER = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2")
MOE_DECODER = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

ADAPTERS: dict[str, ArchitectureAdapter] = {
    model_type: ArchitectureAdapter(family=model_type) for model_type in DENSE_DECODER + MOE_DECODER
}


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        adapter = ADAPTERS[model_type]
    except KeyError:
        raise LrcompressError(
            f"architecture {model_type!r} has no adapter; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
    try:
        adapter.decoder_layers(model)
    except AttributeError as error:
        raise LrcompressError(f"{model_type}: expected decoder layers at {adapter.layers}: {error}") from None
    return adapter
