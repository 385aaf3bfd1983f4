"""Where the engine records finished segments of layers, and how it gets them back.

``StagedJournal`` writes every finished segment into the run's staging directory (tensors, module specs,
records) and reads it back: ``restore`` swaps the compressed modules rebuilt from their specs into the
layers and assigns the stored tensors. The engine restores every segment, resumed or just compressed,
before it propagates the calibration inputs through it, so a resumed run and an uninterrupted one
feed the next segment the very same tensors (same values, same layout): their checkpoints are equal
bit for bit. ``MemoryJournal`` keeps nothing (library use without an output directory).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..checkpoint.reader import assign_tensors
from ..checkpoint.staging import StagingDir
from ..checkpoint.writer import unique_tensors
from ..models import ArchitectureAdapter
from ..modules import compressed_modules, module_from_spec
from ..modules.surgery import replace_submodule
from .records import ModuleRecord


class SegmentJournal(Protocol):
    def finished(self, layers: list[int]) -> bool: ...

    def records(self, layers: list[int]) -> list[ModuleRecord]: ...

    def commit(self, model: nn.Module, layers: list[int], records: list[ModuleRecord]) -> None: ...

    def restore(self, model: nn.Module, layers: list[int]) -> None: ...


class MemoryJournal:
    """Nothing is written, nothing is ever finished before the run: the layers stay as compressed."""

    def finished(self, layers: list[int]) -> bool:
        return False

    def records(self, layers: list[int]) -> list[ModuleRecord]:
        raise RuntimeError("a MemoryJournal has no finished segments")

    def commit(self, model: nn.Module, layers: list[int], records: list[ModuleRecord]) -> None:
        pass

    def restore(self, model: nn.Module, layers: list[int]) -> None:
        pass


class StagedJournal:
    """Finished segments in the staging directory. ``writes=False`` (every process but rank 0 of a torchrun
    job): the segments finished before this run are read back like rank 0 reads them, and a segment
    finished now stays as it is in memory — rank 0 writes it, and its tensors there are the same bytes."""

    def __init__(self, staging: StagingDir, adapter: ArchitectureAdapter, dtype: torch.dtype,
                 writes: bool = True) -> None:
        self.staging, self.adapter, self.dtype, self.writes = staging, adapter, dtype, writes
        self._finished = {tuple(segment) for segment in staging.finished()}
        self._before_this_run = set(self._finished)

    def finished(self, layers: list[int]) -> bool:
        return tuple(layers) in self._finished

    def records(self, layers: list[int]) -> list[ModuleRecord]:
        return [ModuleRecord(**record) for record in self.staging.segment_info(layers)["records"]]

    def commit(self, model: nn.Module, layers: list[int], records: list[ModuleRecord]) -> None:
        if not self.writes:
            return
        named, specs = [], {}
        for i in layers:
            prefix = self.adapter.layer_prefix(i)
            layer = model.get_submodule(prefix)
            named += [(f"{prefix}.{name}", t) for name, t in layer.state_dict().items()]
            specs.update({f"{prefix}.{name}": module.spec() for name, module in compressed_modules(layer)})
        tensors, aliases = unique_tensors(named)
        self.staging.write_segment(layers, tensors, {"specs": specs, "aliases": aliases,
                                                   "records": [record.to_dict() for record in records]})
        self._finished.add(tuple(layers))

    def restore(self, model: nn.Module, layers: list[int]) -> None:
        if not self.writes and tuple(layers) not in self._before_this_run:
            return
        tensors, info = self.staging.read_segment(layers)
        with torch.device("meta"):  # shapes only: the stored tensors are assigned next
            for name, spec in info["specs"].items():
                replace_submodule(model, name, module_from_spec(spec, self.dtype))
        where = self.staging.path / f"layers {layers}"
        for i in layers:  # in order: an alias points at a tensor of an earlier layer of the segment
            prefix = self.adapter.layer_prefix(i)
            own = {name: t for name, t in tensors.items() if name.startswith(prefix + ".")}
            assign_tensors(model, prefix, own, info["aliases"], where)
