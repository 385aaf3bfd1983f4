"""Layer-streamed perplexity, for models whose decoder layers are not in memory (``runtime.lazy``).

The same computation as the model's forward, reordered: capture what every decoder layer receives for
every eval window (the pipeline's capture: embeddings, and each layer's own mask and position
embeddings), then load each layer from a ``LayerStore``, run every window through it and release it,
then apply the model's head (``ArchitectureAdapter.head_logits``: final norm, LM head, logit scaling or
soft-capping) and sum the NLL. Peak memory is one layer plus the hidden states of all eval windows.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import ArchitectureAdapter
from ..models.lazy import LayerStore
from ..models.capture import capture_layer_inputs, forward_layer
from .perplexity import batch_nll


class StreamedNll:
    """A ``WindowsNll`` that streams the decoder layers of ``model`` through ``store``."""

    def __init__(self, store: LayerStore, adapter: ArchitectureAdapter) -> None:
        self.store, self.adapter = store, adapter

    @torch.no_grad()
    def __call__(self, model: nn.Module, windows: torch.Tensor, batch_size: int,
                 device: torch.device) -> list[float]:
        offload = torch.device("cpu")
        hidden = capture_layer_inputs(model, self.adapter, windows, batch_size, device, offload)
        for i, layer in enumerate(self.adapter.decoder_layers(model)):
            self.store.load([i])
            home = next(layer.parameters()).device
            layer.to(device)
            hidden = forward_layer(layer, hidden, device, offload)
            layer.to(home)
            self.store.release([i])
        head = [model.get_submodule(self.adapter.final_norm), model.get_submodule(self.adapter.lm_head)]
        homes = [next(module.parameters()).device for module in head]
        sums: list[float] = []
        try:
            for module in head:
                module.to(device)
            for states, batch in zip(hidden.hidden, windows.split(batch_size)):
                sums += batch_nll(self.adapter.head_logits(model, states.to(device)), batch.to(device))
        finally:
            for module, home in zip(head, homes):
                module.to(home)
        return sums
