"""Pre-passes: statistics that layer-wise forward hooks cannot give (e.g. gradients of the LM loss).

A pre-pass kind is registered here with the function that computes it over the whole model before
the layer loop. ``run_prepasses`` runs each kind that some stage ``needs`` exactly once, for the union
of the modules targeted by the stages that need it, and returns a mapping full module name →
{kind: Statistic} that the engine hands to the compressors beside the forward statistics. Neither
this module nor the engine knows which method asks for which kind.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn

from ..compressor import Statistic
from ..models import ArchitectureAdapter
from .settings import Stage
from .walk import LayerWalk


@dataclass
class PrePassResult:
    """One statistic per target module (full name), and what the pass reports (time, memory, ...)."""

    statistics: dict[str, Statistic]
    report: dict[str, Any] = field(default_factory=dict)


PrePass = Callable[[LayerWalk, list[str]], PrePassResult]

PREPASSES: dict[str, PrePass] = {}


def register_prepass(kind: str) -> Callable[[PrePass], PrePass]:
    """Decorator: ``kind`` (a statistic name that compressors may list in ``needs``) is computed by
    the decorated function ``(walk, targets) -> PrePassResult`` (``walk``: the uncompressed model and the
    calibration windows, ``pipeline.walk.LayerWalk``; ``targets``: full module names)."""

    def wrap(function: PrePass) -> PrePass:
        if kind in PREPASSES:
            raise ValueError(f"pre-pass {kind!r} registered twice")
        PREPASSES[kind] = function
        return function

    return wrap


def is_prepass_kind(kind: str) -> bool:
    return kind in PREPASSES


@dataclass
class PrePassOutput:
    statistics: dict[str, dict[str, Statistic]] = field(default_factory=dict)   # module → kind → stat
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)           # kind → report

    @property
    def seconds(self) -> float:
        return sum(float(r.get("seconds", 0.0)) for r in self.reports.values())


def prepass_targets(model: nn.Module, adapter: ArchitectureAdapter, stages: Iterable[Stage],
                    kind: str) -> list[str]:
    """Full names of every module targeted by a stage that needs ``kind``, in model order, once."""
    names: list[str] = []
    needing = [stage for stage in stages if kind in stage.needs]
    for index, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(index)
        for stage in needing:
            for name in stage.select(layer, prefix):
                full = f"{prefix}.{name}"
                if full not in names:
                    names.append(full)
    return names


def run_prepasses(walk: LayerWalk, stages: list[Stage]) -> PrePassOutput:
    """Run every pre-pass kind some stage needs, once each; an empty output when none is needed."""
    model, adapter, windows, settings = walk.model, walk.adapter, walk.windows, walk.settings
    kinds = sorted({kind for stage in stages for kind in stage.needs if is_prepass_kind(kind)})
    output = PrePassOutput()
    for kind in kinds:
        targets = prepass_targets(model, adapter, stages, kind)
        walk.observer.phase(f"pre-pass {kind!r} over {len(windows)} windows for {len(targets)} modules")
        started = time.perf_counter()
        result = PREPASSES[kind](walk, targets)
        # Each process ran its shard of the windows: merge every process's statistics, in rank order.
        result.statistics = settings.collective.reduce_statistics(result.statistics)
        result.report.setdefault("seconds", time.perf_counter() - started)
        result.report.setdefault("targets", len(targets))
        missing = [name for name in targets if name not in result.statistics]
        if missing:
            raise RuntimeError(f"pre-pass {kind!r} returned no statistic for {missing[:3]}")
        for name, statistic in result.statistics.items():
            output.statistics.setdefault(name, {})[kind] = statistic
        output.reports[kind] = result.report
    return output
