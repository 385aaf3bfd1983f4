"""Capture what decoder layer 0 receives (hidden states + keyword inputs) for every window."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from .adapters import ArchitectureAdapter


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Per-batch hidden states (on the offload device) and the layer's keyword inputs for that batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.hidden)


def move(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``; leave other values alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


def layer_output(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers ≥ 5) or a tuple whose first item is the tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor,
                         batch_size: int, compute: torch.device, offload: torch.device) -> LayerInputs:
    """Run the model up to decoder layer 0 for each batch of windows and keep that layer's inputs."""
    first_layer = adapter.decoder_layers(model)[0]
    captured = LayerInputs([], [])

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        rest.pop("past_key_values", None)
        rest["use_cache"] = False
        captured.hidden.append(hidden.detach().to(offload))
        captured.kwargs.append(move(rest, offload))
        raise _StopForward

    outer = adapter.outer_modules(model)
    homes = [next(m.parameters(), next(m.buffers(), torch.empty(0))).device for m in outer]
    for module in outer:
        module.to(compute)
    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(compute), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for module, home in zip(outer, homes):
            module.to(home)
    return captured


def forward_layer(layer: nn.Module, inputs: LayerInputs, compute: torch.device, offload: torch.device,
                  guard: Callable[[int, int], ContextManager] | None = None) -> LayerInputs:
    """Every batch through one decoder layer on ``compute``; the outputs are kept on ``offload``.

    ``guard(batch number, batches)`` wraps each batch (the engine uses it to name the layer and batch in
    an out-of-memory error)."""
    hidden = []
    for number, (batch, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        with guard(number, len(inputs)) if guard else nullcontext():
            out = layer_output(layer(batch.to(compute), **move(kwargs, compute)))
            hidden.append(out.to(offload))
    return LayerInputs(hidden, inputs.kwargs)
