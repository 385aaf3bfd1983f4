"""The one walk over a model's decoder layers, shared by the engine, the pre-passes and streamed evaluation.

Every one of them does the same thing around its own work: capture what the first decoder layer receives
for the calibration (or evaluation) windows, then per layer (or segment of layers) load it from the layer
store (a lazy model holds one segment at a time), move it to the compute device, hook some of its
modules, run the batches through it, move it back and release it. ``LayerWalk`` holds what that needs
(model, adapter, windows, settings, observer, store) so that it travels as one argument, and
``layers()`` / ``segments()`` / ``on_device()`` / ``hooks()`` are the steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..models import ArchitectureAdapter
from ..models.capture import LayerInputs, capture_layer_inputs, forward_layer
from ..models.lazy import LayerStore, ResidentLayers
from .observer import PipelineObserver
from .oom import naming_out_of_memory
from .settings import PipelineSettings

Hook = Callable[..., None]


@dataclass
class LayerWalk:
    """What a walk over the decoder layers holds; ``store`` says where the layers' weights come from
    (default: already in memory)."""

    model: nn.Module
    adapter: ArchitectureAdapter
    windows: torch.Tensor
    settings: PipelineSettings
    observer: PipelineObserver = field(default_factory=PipelineObserver)
    store: LayerStore = field(default_factory=ResidentLayers)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.adapter.decoder_layers(self.model)

    def capture(self) -> LayerInputs:
        """What the first decoder layer receives for every window (batched, on the offload device)."""
        s = self.settings
        return capture_layer_inputs(self.model, self.adapter, self.windows, s.batch_size, s.compute, s.offload)

    def forward(self, layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
        """Every batch through ``layer``; an out-of-memory error names the layer and the batch."""
        s = self.settings

        def guard(number: int, batches: int):
            return naming_out_of_memory(lambda: f"in layer {inputs.layer} running batch "
                                        f"{number + 1}/{batches}", s)
        return forward_layer(layer, inputs, s.compute, s.offload, guard)

    def segments(self, size: int, loads: Callable[[list[int]], bool] = lambda _: True) -> Iterator[list[int]]:
        """Consecutive runs of ``size`` layers, each loaded from the store (when ``loads`` says so) before it
        is yielded and released after."""
        count = len(self.decoder_layers)
        for start in range(0, count, size):
            indices = list(range(start, min(start + size, count)))
            if loads(indices):
                self.store.load(indices)
            yield indices
            self.store.release(indices)

    def layers(self, indices: Iterable[int]) -> Iterator[tuple[int, nn.Module]]:
        """Each layer of ``indices`` ready to run: loaded and on the compute device; put back after."""
        for index in indices:
            self.store.load([index])
            with self.on_device([index]):
                yield index, self.decoder_layers[index]
            self.store.release([index])

    @contextlib.contextmanager
    def on_device(self, indices: Iterable[int]) -> Iterator[None]:
        """The layers of ``indices`` on the compute device for the duration, then back where they were."""
        layers = [self.decoder_layers[i] for i in indices]
        with on_device(layers, self.settings.compute):
            yield


@contextlib.contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """``modules`` moved to ``device`` for the duration, then back home (each where its first parameter was)."""
    homes = [next(module.parameters(), torch.empty(0)).device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


@contextlib.contextmanager
def hooks(layer: nn.Module, names: Iterable[str], make: Callable[[str], Hook], pre: bool = False) -> Iterator[None]:
    """``make(name)`` registered as a forward hook (a pre-hook with ``pre``) on each named submodule of
    ``layer`` for the duration; removed after, even on an error."""
    modules = [(name, layer.get_submodule(name)) for name in names]
    handles = [module.register_forward_pre_hook(make(name)) if pre else module.register_forward_hook(make(name))
               for name, module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
