"""The plan of a run: every target module, its method, and its size before and after.

Built from the model's modules and the compressors' ``plan`` alone (no weights, no statistics), so it
works on a skeleton on the meta device: ``--dry-run`` and the checks before a run (``preflight``) see
the very modules the run would compress without loading the model.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import adapter_for
from .settings import Stage


@dataclass
class PlannedModule:
    name: str
    stage: int
    method: str
    out_features: int
    in_features: int
    params_before: int
    params_after: int
    rank: int | None
    grows: bool = False         # a method meant to shrink that would not (e.g. a rank at or above m·n/(m+n))


def plan_modules(model: nn.Module, stages: list[Stage]) -> list[PlannedModule]:
    """Every target module with its method and size before/after, without touching any weight."""
    adapter = adapter_for(model)
    planned: list[PlannedModule] = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(index)
        for stage in stages:
            for name in stage.select(layer, prefix):
                module = layer.get_submodule(name)
                plan = stage.compressor.plan(module)
                before = sum(p.numel() for p in module.parameters())
                out_f, in_f = stage.shape(module, model.config)
                grows = stage.compressor.shrinks and plan.params_after >= before
                planned.append(PlannedModule(f"{prefix}.{name}", stage.index, stage.compressor.name,
                                             out_f, in_f, before, plan.params_after, plan.rank, grows))
    return planned
