"""What a stage compresses in a decoder layer, and what differs between the two kinds of target.

A stage's patterns (glob, or ``re:`` regular expressions) are matched against full dotted names from
the model root, e.g. ``model.layers.3.mlp.down_proj``. A stage targets either Linears (``LinearTargets``)
or whole blocks located by the adapter, such as an MoE layer (``BlockTargets``, in ``pipeline.blocks``);
``Stage.kind`` picks one of the two once, and the engine runs one path for both, asking the kind only
for what differs: which modules it selects, which statistics it needs, how the replacement's output
error is measured, and what a replacement changes beyond itself (the model config).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..compressor import Compressor, CompressResult, GroupMember
from ..compressor.linalg import relative_output_error
from ..compressor.stats import gram_of
from ..errors import NumericalError
from ..modules import CompressedLinear, dense_weight


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def chosen(full_name: str, targets: list[str], ignore: list[str]) -> bool:
    """Matched by a target pattern and by no ignore pattern."""
    return any(matches(full_name, p) for p in targets) and not any(matches(full_name, p) for p in ignore)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, CompressedLinear))


def select_targets(layer: nn.Module, prefix: str, targets: list[str], ignore: list[str]) -> list[str]:
    """Names (relative to ``layer``) of its linear modules matched by ``targets`` and not ``ignore``.

    Submodules of an already compressed module (its factor linears) are never targets themselves.
    """
    selected: list[str] = []
    inside_compressed: list[str] = []
    for name, module in layer.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside_compressed):
            continue
        if isinstance(module, CompressedLinear):
            inside_compressed.append(name)
        if is_linear_like(module) and chosen(f"{prefix}.{name}", targets, ignore):
            selected.append(name)
    return selected


@dataclass
class Measured:
    """The replacement's relative output error on the calibration inputs, and the shape it maps."""

    error: float
    out_features: int
    in_features: int


class TargetKind(Protocol):
    distributed: bool          # whether a stage's decompositions may be spread over processes
    matches_outputs: bool      # whether output matching (runtime.target: original) fits and measures it

    def select(self, layer: nn.Module, prefix: str, stage: Any) -> list[str]: ...

    def needs(self, compressor: Compressor) -> frozenset[str]: ...

    def shape(self, module: nn.Module, config: Any) -> tuple[int, int]: ...

    def measure(self, member: GroupMember, original: nn.Module, replacement: nn.Module, result: CompressResult,
                method: str) -> Measured: ...

    def details(self, result: CompressResult) -> dict[str, Any]: ...

    def update_config(self, model: nn.Module, compressor: Compressor, result: CompressResult,
                      applied: dict[str, tuple], name: str) -> None: ...


class LinearTargets:
    """Linears: error ‖X(W−Ŵ)ᵀ‖_F / ‖XWᵀ‖_F from the Gram (always collected), W the module's original
    weight (before the run's first stage); the decompositions may be spread over processes."""

    distributed = True
    matches_outputs = True

    def select(self, layer: nn.Module, prefix: str, stage: Any) -> list[str]:
        return select_targets(layer, prefix, stage.targets, stage.ignore)

    def needs(self, compressor: Compressor) -> frozenset[str]:
        return compressor.needs | {"gram"}

    def shape(self, module: nn.Module, config: Any) -> tuple[int, int]:
        return module.out_features, module.in_features

    def measure(self, member: GroupMember, original: nn.Module, replacement: nn.Module, result: CompressResult,
                method: str) -> Measured:
        approx = dense_weight(replacement).detach()
        if not torch.isfinite(approx).all():
            raise NumericalError(f"{member.name}: {method} produced NaN/Inf factors (path: {result.numerical_path})")
        weight = dense_weight(original).detach().to(approx.device)
        error = relative_output_error(weight, approx, gram_of(member.stats).gram(member.name).to(weight.device))
        return Measured(error, weight.shape[0], weight.shape[1])

    def details(self, result: CompressResult) -> dict[str, Any]:
        return result.details

    def update_config(self, model: nn.Module, compressor: Compressor, result: CompressResult,
                      applied: dict[str, tuple], name: str) -> None:
        """A Linear's replacement changes nothing beyond itself."""
