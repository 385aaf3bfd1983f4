"""Capture what every decoder layer receives from the model's own forward, and replay it.

A decoder layer's inputs are its hidden states plus whatever the model's forward computes once and
hands it: attention mask, rotary position embeddings, position ids. These can differ between layers:
Gemma 2/3, Mistral-style sliding windows and hybrids pick a mask per ``config.layer_types`` entry, and
Gemma 3 also a rotary base per layer type. So the capture records the call of *every* layer, not layer
0's: the model's forward runs once per batch with every decoder layer's ``forward`` replaced by a
recorder that keeps its arguments and hands the hidden states through unchanged (no layer computes,
so this also works when the layers' weights are on the meta device), and stops after the last layer.

Tensors shared between layers (one mask per layer type, one rotary pair per type) are stored once.
What a layer receives from the layers before it (its hidden states) is the one thing replayed from
the pipeline's own propagation; the test of record (tests/models/test_capture.py) checks, per family,
that replay with no compression reproduces the model's forward layer by layer.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from ..errors import LrcompressError
from .adapters import ArchitectureAdapter


class _StopForward(Exception):
    pass


def move(value: Any, device: torch.device, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``; leave other values alone.
    ``memo`` (id → moved tensor) keeps a tensor shared between several values shared after the move."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device, memo) for k, v in value.items()}
    return value


def layer_output(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers ≥ 5) or a tuple whose first item is the tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass(frozen=True)
class LayerCall:
    """What the model's forward passed one decoder layer besides its hidden states."""

    args: tuple                      # positional inputs after the hidden states (usually none)
    kwargs: dict[str, Any]

    def to(self, device: torch.device, memo: dict[int, torch.Tensor] | None = None) -> "LayerCall":
        memo = {} if memo is None else memo
        return LayerCall(move(self.args, device, memo), move(self.kwargs, device, memo))

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` on ``hidden`` with these inputs; the output hidden states."""
        return layer_output(layer(hidden, *self.args, **self.kwargs))


class LayerCalls:
    """Per batch of windows, the ``LayerCall`` of every decoder layer (shared tensors stored once)."""

    def __init__(self) -> None:
        self._batches: list[list[LayerCall]] = []

    def append(self, calls: list[LayerCall]) -> None:
        self._batches.append(calls)

    def __len__(self) -> int:
        return len(self._batches)

    def get(self, layer: int, batch: int) -> LayerCall:
        return self._batches[batch][layer]

    def batch(self, batch: int, device: torch.device) -> list[LayerCall]:
        """Every layer's call for one batch on ``device``, tensors shared between layers moved once."""
        memo: dict[int, torch.Tensor] = {}
        return [call.to(device, memo) for call in self._batches[batch]]

    def kinds(self) -> list[list[int]]:
        """Groups of layers that receive the same inputs (e.g. sliding vs full attention layers)."""
        if not self._batches:
            return []
        groups: dict[tuple, list[int]] = {}
        for index, call in enumerate(self._batches[0]):
            groups.setdefault(_identity(call), []).append(index)
        return list(groups.values())


def _identity(value: Any) -> Any:
    """A hashable key that is equal for values holding the very same tensors and equal other values."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, LayerCall):
        return (_identity(value.args), _identity(value.kwargs))
    if isinstance(value, (tuple, list)):
        return tuple(_identity(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _identity(v)) for k, v in value.items()))
    try:
        hash(value)
        return value
    except TypeError:
        return ("object", id(value))


@dataclass
class LayerInputs:
    """The inputs of decoder layer ``layer`` for every batch: hidden states (on the offload device) and
    the calls recorded from the model's forward (the same ``LayerCalls`` for every layer). A second
    activation stream through the same layers (e.g. the uncompressed model's) is another
    ``LayerInputs`` over the same ``calls``: ``LayerInputs(i, its_hidden, inputs.calls)``."""

    layer: int
    hidden: list[torch.Tensor]
    calls: LayerCalls

    def __len__(self) -> int:
        return len(self.hidden)

    def call(self, batch: int) -> LayerCall:
        """What layer ``self.layer`` receives besides the hidden states of ``batch``."""
        return self.calls.get(self.layer, batch)

    def batches(self, device: torch.device) -> Iterator[tuple[torch.Tensor, LayerCall]]:
        """(hidden states, call) per batch, on ``device``: ``call(layer, hidden)`` runs the layer."""
        for number, hidden in enumerate(self.hidden):
            yield hidden.to(device), self.call(number).to(device)

    def following(self, hidden: list[torch.Tensor]) -> "LayerInputs":
        """The next layer's inputs, given this layer's outputs ``hidden``."""
        return LayerInputs(self.layer + 1, hidden, self.calls)


@contextmanager
def _recording(layers: nn.ModuleList) -> Iterator[dict[int, tuple[torch.Tensor, LayerCall]]]:
    """Replace each layer's ``forward`` by a recorder of its arguments (hidden states passed through);
    the last layer's recorder stops the model's forward. Yields the dict the recorders fill."""
    seen: dict[int, tuple[torch.Tensor, LayerCall]] = {}
    last = len(layers) - 1

    def recorder(index: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs.pop("past_key_values", None)
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if index in seen:
                raise LrcompressError(f"decoder layer {index} was called twice in one forward; lrcompress "
                                      "replays each decoder layer once per forward")
            seen[index] = (hidden, LayerCall(tuple(args[1:]), kwargs))
            if index == last:
                raise _StopForward
            return hidden
        return forward

    # An instance attribute, which nn.Module.__call__ calls; one already there (accelerate's hooks put
    # their wrapper there) is put back afterwards.
    previous = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        yield seen
    finally:
        for layer, forward in zip(layers, previous):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor,
                         batch_size: int, compute: torch.device, offload: torch.device) -> LayerInputs:
    """Run the model's forward for each batch of windows, keeping layer 0's hidden states and every
    layer's other inputs (on ``offload``); the decoder layers themselves do not run."""
    layers = adapter.decoder_layers(model)
    calls, hidden = LayerCalls(), []
    outer = adapter.outer_modules(model)
    homes = [next(m.parameters(), next(m.buffers(), torch.empty(0))).device for m in outer]
    for module in outer:
        module.to(compute)
    try:
        with _recording(layers) as seen:
            for batch in windows.split(batch_size):
                seen.clear()
                try:
                    model(input_ids=batch.to(compute), use_cache=False)
                except _StopForward:
                    pass
                missing = [i for i in range(len(layers)) if i not in seen]
                if missing:
                    raise LrcompressError(f"{type(model).__name__}: its forward did not call decoder layers "
                                          f"{missing[:8]} of {adapter.layers}; lrcompress needs every layer "
                                          "called once, in order")
                memo: dict[int, torch.Tensor] = {}
                hidden.append(seen[0][0].detach().to(offload))
                calls.append([seen[i][1].to(offload, memo) for i in range(len(layers))])
    finally:
        for module, home in zip(outer, homes):
            module.to(home)
    return LayerInputs(0, hidden, calls)


def forward_layer(layer: nn.Module, inputs: LayerInputs, compute: torch.device, offload: torch.device,
                  guard: Callable[[int, int], ContextManager] | None = None) -> LayerInputs:
    """Every batch through decoder layer ``inputs.layer`` (the module ``layer``) on ``compute``; the
    outputs, kept on ``offload``, are the next layer's inputs.

    ``guard(batch number, batches)`` wraps each batch (the engine uses it to name the layer and batch in
    an out-of-memory error)."""
    hidden = []
    for number, batch in enumerate(inputs.hidden):
        with guard(number, len(inputs)) if guard else nullcontext():
            hidden.append(inputs.call(number).to(compute)(layer, batch.to(compute)).to(offload))
    return inputs.following(hidden)
