"""Statistics passes within a layer ("true sequential"): the targets that read the same input form one
pass, compressed before the next pass's statistics are collected.

Without it, a stage collects the statistics of all its targets in a layer from one forward of the intact
layer, so ``o_proj`` (``down_proj``) is fitted to the inputs it gets with ``q/k/v`` (``gate/up``) still
uncompressed, not the ones it receives once they are replaced. For the layer-wise objective that is a
mismatch of the metric; for output matching (``runtime.target: original``) it is worse: W* is a
regression from inputs the module will never see to the original outputs, and its correction term
reads directions of X̂ that the siblings' compression then changes (bench/RESULTS.md: ``down_proj``'s
true error against the original grows well beyond what its record says). GPTQ's ``true_sequential`` and GPTAQ/QEP run one pass per group of
modules sharing an input; so does this.

The groups are found from one batch, not from module names: the targets are hooked, the layer runs once,
and targets called with the very same input tensor (q, k and v on the normed hidden states; gate and up)
share a pass, in the order of their first call (a topological order: a module's input can only depend
on modules called before it). Targets not called on that batch (an expert no token reached) get the
last pass. Cost: one forward of the layer per pass instead of one per stage (4 for a Llama layer),
plus the discovery forward of one batch.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.capture import LayerInputs


def input_groups(layer: nn.Module, names: list[str], inputs: LayerInputs, device: torch.device) -> list[list[str]]:
    """``names`` (targets of ``layer``) grouped by the input tensor they are called with, in call order."""
    first_input: dict[str, torch.Tensor] = {}

    def pre_hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            first_input.setdefault(name, args[0])
        return record

    handles = [layer.get_submodule(name).register_forward_pre_hook(pre_hook(name)) for name in names]
    try:
        with torch.no_grad():
            inputs.call(0).to(device)(layer, inputs.hidden[0].to(device))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in first_input.items():      # insertion order = call order
        group = next((members for shared, members in groups if shared is tensor), None)
        if group is None:
            groups.append((tensor, [name]))
        else:
            group.append(name)
    ordered = [members for _, members in groups]
    missing = [name for name in names if name not in first_input]
    return ordered + ([missing] if missing else [])
