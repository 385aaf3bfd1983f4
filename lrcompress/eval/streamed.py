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
from ..pipeline.settings import PipelineSettings
from ..pipeline.walk import LayerWalk, on_device
from .perplexity import batch_nll


class StreamedNll:
    """A ``WindowsNll`` that streams the decoder layers of ``model`` through ``store``."""

    def __init__(self, store: LayerStore, adapter: ArchitectureAdapter) -> None:
        self.store, self.adapter = store, adapter

    @torch.no_grad()
    def __call__(self, model: nn.Module, windows: torch.Tensor, batch_size: int,
                 device: torch.device) -> list[float]:
        settings = PipelineSettings(batch_size=batch_size, compute=device, offload=torch.device("cpu"))
        walk = LayerWalk(model, self.adapter, windows, settings, store=self.store)
        hidden = walk.capture()
        for _, layer in walk.layers(range(len(walk.decoder_layers))):
            hidden = walk.forward(layer, hidden)
        head = [model.get_submodule(self.adapter.final_norm), model.get_submodule(self.adapter.lm_head)]
        sums: list[float] = []
        with on_device(head, device):
            for states, batch in zip(hidden.hidden, windows.split(batch_size)):
                sums += batch_nll(self.adapter.head_logits(model, states.to(device)), batch.to(device))
        return sums
