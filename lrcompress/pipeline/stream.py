"""What runs beside the compressed model while the engine walks it: the engine's one seam for output matching.

The engine asks its stream, at fixed points of every segment, what to collect, how to run a layer's
statistics pass, what each stage compresses and how each record's error is measured. ``LayerStream`` is
the default (``runtime.target: layer``): nothing runs beside, each module is fitted to its own weight's
outputs on the inputs it receives. ``pipeline.reference.ReferenceStream`` (``runtime.target: original``)
carries the uncompressed model's activations beside the compressed ones; ``reference.stream_for`` picks one.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..compressor import GroupMember, Statistic
from ..models.capture import LayerInputs
from .settings import Stage

Forward = Callable[[nn.Module, LayerInputs], LayerInputs]


class LayerStream:
    """The layer-wise objective: the engine's passes run the compressed model alone."""

    # A segment finished in an earlier run is replayed from the journal; does the stream need its
    # original weights loaded all the same (to run them beside)?
    loads_finished_segments = False

    def __init__(self, forward: Forward) -> None:
        self.forward = forward

    def needs(self, stage: Stage) -> frozenset[str]:
        """The statistics a stage's pass collects."""
        return stage.needs

    def begin(self, layers: nn.ModuleList, indices: list[int]) -> None:
        """A segment starts (before any stage replaces one of its modules)."""

    def finish(self, indices: list[int]) -> None:
        """A segment is compressed (or replayed) and propagated."""

    def collect(self, index: int, layer: nn.Module, names: list[str], stats: dict[str, dict[str, Statistic]],
                inputs: LayerInputs) -> LayerInputs:
        """Every batch through ``layer`` (its targets ``names`` hooked by the engine); its outputs."""
        return self.forward(layer, inputs)

    def target_members(self, stage: Stage, members: list[GroupMember], originals: list[nn.Module]
                       ) -> list[GroupMember]:
        """What a stage compresses: the members as they are."""
        return members

    def measured(self, stage: Stage, member: GroupMember, original: nn.Module, replacement: nn.Module,
                 error: float) -> tuple[float, dict[str, Any]]:
        """A record's error and the details to add: the error against the module's own outputs, unchanged."""
        return error, {}

    def report(self) -> Any:
        """What the stream cost, for metrics.json (None: nothing ran beside)."""
        return None
