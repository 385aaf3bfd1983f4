"""Base classes of the modules that compressed weights become, and the registry the loader uses.

``CompressedModule`` is what the checkpoint writer and reader know: a kind, a ``spec()`` saved in
config.json, ``from_spec`` to rebuild an empty module, and the params/bytes accounting.
``CompressedLinear`` is the common case, a drop-in ``nn.Linear`` (a Linear target of later stages);
other compressed modules (the low-rank experts of an MoE block) derive from ``CompressedModule``
directly, so that they are written and loaded but never taken for Linears.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

MODULE_KINDS: dict[str, type["CompressedModule"]] = {}


def register_module_kind(cls: type["CompressedModule"]) -> type["CompressedModule"]:
    MODULE_KINDS[cls.kind] = cls
    return cls


class CompressedModule(nn.Module):
    """A module stored in a compressed form that the checkpoint reader rebuilds.

    Subclasses describe their shape in ``spec()`` (saved in config.json) so that the loader can
    rebuild an empty module of the right shape with ``from_spec`` before reading the tensors.
    """

    kind: ClassVar[str]

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "CompressedModule":
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """A plain module computing the same function, with the parameter names of the uncompressed
        architecture (for the dense export)."""
        raise NotImplementedError

    def prepare_inference(self) -> None:
        """Build once, after loading, whatever layout makes the forward fast (a packed kernel weight).
        Nothing by default; called on every compressed module by :func:`prepare_for_inference`."""

    def inference_tensors(self) -> list[torch.Tensor]:
        """The tensors :meth:`prepare_inference` built (outside the state dict), for memory accounting."""
        return []

    def release_inference(self) -> None:
        """Drop what :meth:`prepare_inference` built, so the forward computes from the stored tensors again
        (while they are trained a cached product would hide their gradients and go stale)."""

    @classmethod
    def describe_shape(cls, spec: dict[str, Any]) -> str:
        """The shape a spec describes, for people (``inspect``): out × in for a linear."""
        return f"{spec['out_features']}×{spec['in_features']}"

    def stored_params(self) -> int:
        """Number of stored weight values, the unit of the ratio accounting (metadata such as
        quantization scales, sparse masks or indices is not a value; ``storage_bytes`` counts it)."""
        return sum(p.numel() for p in self.parameters())

    def storage_bytes(self) -> int:
        """Exact bytes of every tensor this module writes to the checkpoint."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class CompressedLinear(CompressedModule):
    """A drop-in replacement of ``nn.Linear`` whose weight is stored in a compressed form."""

    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight (out × in), for errors, export and later stages."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        return to_dense_linear(self)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The effective (out × in) weight of a Linear or of any compressed replacement."""
    if isinstance(module, CompressedLinear):
        return module.dense_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor a compressed linear module")


def stored_params(module: nn.Module) -> int:
    if isinstance(module, CompressedModule):
        return module.stored_params()
    return sum(p.numel() for p in module.parameters())


def storage_bytes(module: nn.Module) -> int:
    """Bytes the module occupies in a checkpoint (dense: its parameters in their dtype)."""
    if isinstance(module, CompressedModule):
        return module.storage_bytes()
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def compressed_modules(model: nn.Module) -> list[tuple[str, CompressedModule]]:
    """The outermost compressed modules (a compressed module nested in another, such as the base
    of a compensated module, belongs to its parent's spec and is not listed)."""
    found: list[tuple[str, CompressedModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedModule) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def column_major(weight: torch.Tensor) -> None:
    """Store a CPU (out × in) weight column-major, in place: same shape and values, its transpose is now
    the contiguous tensor. ``F.linear(x, weight)`` is x·weightᵀ, and at one decode token the BLAS reads a
    contiguous right operand (x·B, row by row) at a higher bandwidth than a transposed one (rows of W
    dotted with x; bench/RESULTS.md has the measurement). No extra
    memory: the old storage is released. Writers copy tensors contiguous, so checkpoints do not change."""
    if weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous():
        weight.data = weight.data.t().contiguous().t()


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Let every compressed module (nested ones included) build its inference layout; loaders call
    this after the tensors are in place, the compression pipeline never does (it needs the exact
    reference computation)."""
    for module in model.modules():
        if isinstance(module, CompressedModule):
            module.prepare_inference()
    return model


def module_spec(module: nn.Module) -> dict[str, Any]:
    """The spec of a compressed module, or of a plain ``nn.Linear`` (kind "linear"), for nesting."""
    if isinstance(module, CompressedModule):
        return module.spec()
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    raise TypeError(f"{type(module).__name__} has no spec: neither nn.Linear nor a compressed module")


def spec_shape(spec: dict[str, Any]) -> str:
    """Human-readable shape of a compressed module's spec (any registered kind)."""
    kind = MODULE_KINDS.get(spec["kind"])
    return kind.describe_shape(spec) if kind is not None else "?"


def module_from_spec(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Inverse of :func:`module_spec`: an empty module of the right shape, to load tensors into."""
    if spec["kind"] == "linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype)
    kind = MODULE_KINDS.get(spec["kind"])
    if kind is None:
        raise KeyError(f"unknown compressed module kind {spec['kind']!r}; known: {sorted(MODULE_KINDS)}")
    return kind.from_spec(spec, dtype)


def to_dense_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function (for the dense export)."""
    weight = dense_weight(module).detach()
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
