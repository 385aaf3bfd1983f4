"""Mixture-of-experts blocks as transformers 5 defines them: where the router and the experts live.

Every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3) has the same shape in
transformers 5: the decoder layer's ``mlp`` is a sparse block with ``gate`` (the router: a parameter
``weight`` of E × hidden, plus per-expert buffers such as DeepSeek-V3's ``e_score_correction_bias``,
returning ``(logits, top-k weights, top-k indices)``) and ``experts`` (fused 3-D parameters
``gate_up_proj`` E × 2I × hidden and ``down_proj`` E × hidden × I). Shared experts (Qwen2-MoE's
``shared_expert`` + ``shared_expert_gate``, DeepSeek's ``shared_experts``) sit beside them and are
left untouched. Dense layers of MoE models (DeepSeek's first k layers, Qwen's ``mlp_only_layers``)
have a plain MLP there and are not MoE blocks.

Routing is always delegated to the block's own router, so each family's rule (softmax or sigmoid,
renormalized or not, group-limited) is the one of the installed transformers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LrcompressError

BLOCK_NAME = "mlp"

# The config attribute holding the routed-expert count, per model_type (what the modeling code reads).
EXPERT_COUNT_KEYS: dict[str, str] = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
}


@dataclass
class ExpertWeights:
    """Per-expert weights of one block, unfused: gate/up E × I × hidden, down E × hidden × I."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def __len__(self) -> int:
        return self.gate.shape[0]

    def types(self) -> dict[str, torch.Tensor]:
        return {"gate": self.gate, "up": self.up, "down": self.down}


def is_moe_block(module: nn.Module) -> bool:
    """A sparse block: a router with an E × hidden weight and fused 3-D expert parameters."""
    experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
    return (experts is not None and gate is not None
            and getattr(getattr(experts, "gate_up_proj", None), "ndim", 0) == 3
            and getattr(getattr(experts, "down_proj", None), "ndim", 0) == 3
            and getattr(getattr(gate, "weight", None), "ndim", 0) == 2)


def moe_blocks(layer: nn.Module) -> list[str]:
    """Names (relative to the decoder layer) of its MoE blocks: ``["mlp"]`` or ``[]`` (dense layer)."""
    block = getattr(layer, BLOCK_NAME, None)
    return [BLOCK_NAME] if block is not None and is_moe_block(block) else []


def expert_count_key(config) -> str:
    model_type = getattr(config, "model_type", None)
    try:
        return EXPERT_COUNT_KEYS[model_type]
    except KeyError:
        raise LrcompressError(f"{model_type!r} is not a supported MoE architecture; "
                              f"supported: {', '.join(sorted(EXPERT_COUNT_KEYS))}") from None


def expert_count(block: nn.Module) -> int:
    return int(block.experts.gate_up_proj.shape[0])


def expert_weights(block: nn.Module) -> ExpertWeights:
    """Views of the fused parameters split into gate and up (no copy)."""
    gate_up = block.experts.gate_up_proj.detach()
    inner = gate_up.shape[1] // 2
    return ExpertWeights(gate_up[:, :inner], gate_up[:, inner:], block.experts.down_proj.detach())


def _glu(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate·x) ⊙ (up·x) from the fused projection's output (last dimension 2I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def expert_outputs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every expert applied to every token of ``x`` (T × hidden): E × T × hidden, unweighted."""
    experts = block.experts
    x = x.to(experts.gate_up_proj.dtype)
    hidden = _glu(experts, torch.einsum("th,eoh->eto", x, experts.gate_up_proj))
    return torch.einsum("eti,ehi->eth", hidden, experts.down_proj)


def expert_intermediate(block: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``index``'s intermediate activations act(gate·x) ⊙ (up·x) (the input of its down
    projection) on the tokens ``x`` (T × hidden): T × I."""
    experts = block.experts
    return _glu(experts, nn.functional.linear(x.to(experts.gate_up_proj.dtype), experts.gate_up_proj[index]))


def expert_activation(block: nn.Module) -> nn.Module:
    """The experts' activation module (act_fn of the fused experts)."""
    return block.experts.act_fn


def route(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Top-k expert indices (T × k) chosen by the block's own router for the tokens ``x`` (T × hidden)."""
    return block.gate(x)[2]


def router_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The router's per-expert tensors (parameters and buffers whose first dimension is E)."""
    count = expert_count(block)
    tensors = dict(block.gate.named_parameters(recurse=False))
    tensors.update(dict(block.gate.named_buffers(recurse=False)))
    return {name: t.detach() for name, t in tensors.items() if t.ndim >= 1 and t.shape[0] == count}


def rebuild_block(block: nn.Module, weights: ExpertWeights | nn.Module, router: dict[str, torch.Tensor]
                  ) -> nn.Module:
    """A copy of ``block`` with E' experts: the given expert weights (dense, fused into the block's own
    experts module) or a replacement experts module (e.g. low-rank experts) with the same forward, and
    the given router rows; shared experts, activation and routing settings are copied unchanged. The
    original block is not modified."""
    count = len(weights) if isinstance(weights, ExpertWeights) else int(weights.num_experts)
    top_k = getattr(block.gate, "top_k", 1)
    if count < top_k:
        raise LrcompressError(f"cannot keep {count} experts: the router picks {top_k} per token")
    groups = getattr(block.gate, "num_group", None)
    if groups and (count % groups or count // groups < 2):   # DeepSeek-V3 scores a group by its top 2
        raise LrcompressError(f"cannot keep {count} experts: group-limited routing needs a multiple of "
                              f"n_group={groups} with at least 2 experts per group")
    # Deep-copy the block but share (not copy) what is about to be replaced: it may be large.
    replaced: list = [block.experts.gate_up_proj, block.experts.down_proj]
    if not isinstance(weights, ExpertWeights):
        replaced.append(block.experts)
    replaced += [getattr(block.gate, name) for name in router]
    new = copy.deepcopy(block, memo={id(t): t for t in replaced})
    if isinstance(weights, ExpertWeights):
        dtype = block.experts.gate_up_proj.dtype
        gate_up = torch.cat([weights.gate, weights.up], dim=1).to(dtype).contiguous()
        new.experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        new.experts.down_proj = nn.Parameter(weights.down.to(dtype).contiguous(), requires_grad=False)
        new.experts.num_experts = count
    else:
        new.experts = weights
    for name, tensor in router.items():
        old = getattr(block.gate, name)
        value = tensor.to(old.dtype).contiguous()
        if isinstance(old, nn.Parameter):
            setattr(new.gate, name, nn.Parameter(value, requires_grad=False))
        else:
            new.gate.register_buffer(name, value, persistent=name not in block.gate._non_persistent_buffers_set)
    new.gate.num_experts = count
    return new
