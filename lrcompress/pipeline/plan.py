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
    bytes_before: int = 0
    bytes_after: int = 0


def could_shrink(out_features: int, in_features: int) -> bool:
    """Whether any factorization makes this module smaller: a rank-1 pair, m + n values, is below m·n.

    Modules no rank can shrink (a 1×n gate vector, such as Qwen2-MoE's shared_expert_gate) are compressed
    at rank 1 as the recipe's targets say, and not refused: the recipe did not ask for a size that fails,
    the shape did. A module that could shrink but whose planned size does not (ratio 0, a rank at or
    above the break-even m·n/(m+n)) is what ``preflight.check_growth`` refuses."""
    return out_features + in_features < out_features * in_features


def plan_modules(model: nn.Module, stages: list[Stage]) -> list[PlannedModule]:
    """Every target module with its method and size (bytes and parameters) before/after, without touching
    any weight. A compressor plans from the uncompressed module; for a module an earlier stage already
    planned, the later stage's change (after − uncompressed) is added to the earlier stage's result:
    exact for compensation stages (EoRA adds its factors to whatever the base stored). A stage that acts on
    the factors of an earlier stage (``apply_to: factors``) plans from that stage's spec instead, and gives
    the whole module's size."""
    adapter = adapter_for(model)
    planned: list[PlannedModule] = []
    current: dict[str, tuple[int, int]] = {}           # name -> (params, bytes) after the stages so far
    specs: dict[str, dict | None] = {}                 # name -> the planned spec of the last stage on it
    layers = list(adapter.decoder_layers(model))
    selected = {(stage.index, index): stage.select(layer, adapter.layer_prefix(index))
                for stage in stages for index, layer in enumerate(layers)}
    for index, layer in enumerate(layers):
        prefix = adapter.layer_prefix(index)
        for stage in stages:
            for name in selected[(stage.index, index)]:
                module = layer.get_submodule(name)
                full = f"{prefix}.{name}"
                if stage.compressor.acts_on_factors:
                    plan = stage.compressor.plan_factors(full, specs.get(full), next(module.parameters()).dtype)
                elif stage.group_size > 1:
                    plan = stage.compressor.plan_in_group(full, module, *_membership(selected, stage, index, name,
                                                                                     len(layers)))
                else:
                    plan = stage.compressor.plan_for(full, module)
                dense_params = sum(p.numel() for p in module.parameters())
                dense_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
                itemsize = next(module.parameters()).element_size()
                params_before, bytes_before = current.get(full, (dense_params, dense_bytes))
                if stage.compressor.acts_on_factors:
                    params_after, bytes_after = plan.params_after, plan.bytes_after
                else:
                    after_bytes = plan.bytes_after if plan.bytes_after is not None else plan.params_after * itemsize
                    params_after = params_before + plan.params_after - dense_params
                    bytes_after = bytes_before + after_bytes - dense_bytes
                current[full] = (params_after, bytes_after)
                specs[full] = plan.spec
                out_f, in_f = stage.shape(module, model.config)
                grows = stage.compressor.shrinks and plan.params_after >= dense_params and could_shrink(out_f, in_f)
                planned.append(PlannedModule(full, stage.index, stage.compressor.method_for(full), out_f, in_f, params_before,
                                             params_after, plan.rank, grows, bytes_before, bytes_after))
    return planned


def _membership(selected: dict[tuple[int, int], list[str]], stage: Stage, index: int, name: str, layers: int
                ) -> tuple[int, int]:
    """(members, position): the modules named ``name`` that the group of layer ``index`` compresses together,
    and this one's place among them. The engine groups layers [g·⌊i/g⌋, g·⌊i/g⌋ + g) (the last group may
    be short) and, in each, the layers that select the name."""
    start = index - index % stage.group_size
    owners = [j for j in range(start, min(layers, start + stage.group_size)) if name in selected[(stage.index, j)]]
    return len(owners), owners.index(index)
