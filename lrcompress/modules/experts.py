"""LowRankExperts: the routed experts of an MoE block with every expert weight stored as a low-rank pair.

transformers 5 fuses the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 into
one module with 3-D parameters (``gate_up_proj`` E × 2I × hidden, ``down_proj`` E × hidden × I) and one
forward signature, ``experts(hidden_states (T × hidden), top_k_index (T × k), top_k_weights (T × k))``
→ T × hidden: expert e computes down_e·(act(gate_e·x) ⊙ up_e·x) on the tokens routed to it, scaled by
their routing weight, and the results are summed per token. ``LowRankExperts`` has the same signature
and dispatch (``routed_forward``) with each of gate_e, up_e, down_e stored as B_e·A_e (rank r), which is
what Sub-MoE† produces; ``FusedExperts`` is the dense equivalent for the export.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import CompressedModule, register_module_kind

WEIGHT_TYPES = ("gate", "up", "down")


def activation_name(act_fn: nn.Module) -> str:
    """The transformers ``hidden_act`` name of an activation module (so that a spec can rebuild it)."""
    from transformers.activations import ACT2CLS

    for name, entry in ACT2CLS.items():
        if entry is type(act_fn):          # entries with options are (class, kwargs) tuples: not matched
            return name
    raise TypeError(f"activation {type(act_fn).__name__} has no transformers ACT2FN name")


def make_activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def routed_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   num_experts: int, expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """transformers' fused-experts dispatch: ``expert(e, x_e)`` on the tokens routed to e, weighted by
    their routing weight, summed per token (an index equal to ``num_experts`` is a padding slot)."""
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for index in hit.flatten().tolist():
        if index == num_experts:
            continue
        position, token = torch.where(mask[index])
        y = expert(index, hidden_states[token]) * top_k_weights[token, position, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


class FusedExperts(nn.Module):
    """Dense fused experts with transformers' parameter names and forward (the export of LowRankExperts)."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act: str) -> None:
        super().__init__()
        self.num_experts = gate_up_proj.shape[0]
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        self.act_fn = make_activation(act)

    def _expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = nn.functional.linear(x, self.gate_up_proj[index]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[index])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(hidden_states, top_k_index, top_k_weights, self.num_experts, self._expert)


@register_module_kind
class LowRankExperts(CompressedModule):
    """E routed experts, each weight a rank-r pair: ``<type>_a`` E × r × in, ``<type>_b`` E × out × r
    for type gate (I × hidden), up (I × hidden) and down (hidden × I); W_e = B_e·A_e."""

    kind = "low_rank_experts"

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, rank: int, act: str,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.rank, self.act = rank, act
        self.act_fn = make_activation(act)
        for kind, (out, inp) in self.shapes().items():
            self.register_parameter(f"{kind}_a", nn.Parameter(
                torch.empty(num_experts, rank, inp, dtype=dtype, device=device), requires_grad=False))
            self.register_parameter(f"{kind}_b", nn.Parameter(
                torch.empty(num_experts, out, rank, dtype=dtype, device=device), requires_grad=False))

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each weight type."""
        h, i = self.hidden_size, self.intermediate_size
        return {"gate": (i, h), "up": (i, h), "down": (h, i)}

    @classmethod
    def from_factors(cls, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], act: str,
                     dtype: torch.dtype) -> "LowRankExperts":
        """Build from {type: (B E × out × r, A E × r × in)} for gate, up and down; cast to ``dtype``."""
        gate_b, gate_a = factors["gate"]
        down_b, _ = factors["down"]
        module = cls(gate_b.shape[0], down_b.shape[1], gate_b.shape[1], gate_b.shape[2], act, dtype=dtype,
                     device=gate_b.device)
        with torch.no_grad():
            for kind in WEIGHT_TYPES:
                b, a = factors[kind]
                getattr(module, f"{kind}_b").copy_(b.to(dtype))
                getattr(module, f"{kind}_a").copy_(a.to(dtype))
        return module

    def _apply_weight(self, kind: str, index: int, x: torch.Tensor) -> torch.Tensor:
        a, b = getattr(self, f"{kind}_a")[index], getattr(self, f"{kind}_b")[index]
        return nn.functional.linear(nn.functional.linear(x, a), b)

    def _expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(self._apply_weight("gate", index, x)) * self._apply_weight("up", index, x)
        return self._apply_weight("down", index, hidden)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return routed_forward(hidden_states, top_k_index, top_k_weights, self.num_experts, self._expert)

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """{type: E × out × in} products B_e·A_e."""
        return {kind: getattr(self, f"{kind}_b") @ getattr(self, f"{kind}_a") for kind in WEIGHT_TYPES}

    def to_dense(self) -> FusedExperts:
        w = {k: v.detach() for k, v in self.dense_weights().items()}
        return FusedExperts(torch.cat([w["gate"], w["up"]], dim=1).contiguous(), w["down"].contiguous(), self.act)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_experts": self.num_experts, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "rank": self.rank, "act": self.act}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "LowRankExperts":
        return cls(spec["num_experts"], spec["hidden_size"], spec["intermediate_size"], spec["rank"], spec["act"],
                   dtype=dtype)

    @classmethod
    def describe_shape(cls, spec: dict[str, Any]) -> str:
        h, i = spec["hidden_size"], spec["intermediate_size"]
        return f"{spec['num_experts']} experts × (gate/up {i}×{h}, down {h}×{i})"

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, rank={self.rank}, act={self.act}")
