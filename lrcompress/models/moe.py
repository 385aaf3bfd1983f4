"""Mixture-of-experts blocks as transformers 5 defines them: where the router and the experts live.

Found from structure, not from a list of families: an MoE block is a child of a decoder layer (``mlp``
for Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3; ``block_sparse_moe`` or ``feed_forward`` elsewhere)
that has a router (``gate`` or ``router``: a parameter ``weight`` of E × hidden, plus per-expert
buffers such as DeepSeek-V3's ``e_score_correction_bias``, returning ``(logits, top-k weights, top-k
indices)``) and ``experts``, fused 3-D parameters ``gate_up_proj`` E × 2I × hidden and ``down_proj``
E × hidden × I. transformers marks each experts class with its layout (``is_transposed``,
``is_concatenated``, ``has_bias``, ``has_gate``, set by ``use_experts_implementation``); the layout read
here is the default one ([gate; up] concatenated, not transposed, no bias), which every family above
uses. Other layouts (gpt-oss: interleaved, transposed, with biases) are refused with the layout named.
Shared experts (Qwen2-MoE's ``shared_expert`` + ``shared_expert_gate``, DeepSeek's
``shared_experts``) sit beside them and are left untouched. Dense layers of MoE models (DeepSeek's
first k layers, Qwen's ``mlp_only_layers``) have a plain MLP there and are not MoE blocks.

Routing is always delegated to the block's own router, so each family's rule (softmax or sigmoid,
renormalized or not, group-limited) is the one of the installed transformers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LrcompressError

ROUTER_NAMES = ("gate", "router")
# Config attributes holding the routed-expert count, in the order they are tried (the first one the
# config has is the one its modeling code reads).
EXPERT_COUNT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
# The fused layout read here: transformers' ``use_experts_implementation`` defaults.
DEFAULT_LAYOUT = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}


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


def router_name(block: nn.Module) -> str | None:
    """The attribute of the block's router: a module with an E × hidden ``weight``."""
    return next((name for name in ROUTER_NAMES
                 if getattr(getattr(getattr(block, name, None), "weight", None), "ndim", 0) == 2), None)


def router(block: nn.Module) -> nn.Module:
    return getattr(block, router_name(block))


def is_moe_block(module: nn.Module) -> bool:
    """A sparse block: a router with an E × hidden weight and fused 3-D expert parameters."""
    experts = getattr(module, "experts", None)
    return (experts is not None and router_name(module) is not None
            and getattr(getattr(experts, "gate_up_proj", None), "ndim", 0) == 3
            and getattr(getattr(experts, "down_proj", None), "ndim", 0) == 3)


def check_layout(name: str, block: nn.Module) -> None:
    """Refuse fused experts whose layout differs from the one read here, naming the difference."""
    experts = block.experts
    differs = {key: getattr(experts, key) for key, value in DEFAULT_LAYOUT.items()
               if getattr(experts, key, value) != value}
    if differs:
        raise LrcompressError(f"{name}: {type(experts).__name__} stores its experts as {differs}; lrcompress reads "
                              f"fused experts in the layout {DEFAULT_LAYOUT} (gate_up_proj E × 2I × hidden)")


def moe_blocks(layer: nn.Module) -> list[str]:
    """Names (relative to the decoder layer) of its MoE blocks: e.g. ``["mlp"]``, or ``[]`` (dense layer)."""
    names = [name for name, child in layer.named_children() if is_moe_block(child)]
    for name in names:
        check_layout(name, layer.get_submodule(name))
    return names


def expert_count_key(config) -> str:
    """The config attribute the modeling code reads for the number of routed experts."""
    key = next((key for key in EXPERT_COUNT_KEYS if isinstance(getattr(config, key, None), int)), None)
    if key is None:
        raise LrcompressError(f"{getattr(config, 'model_type', None)!r}: no routed-expert count in its config "
                              f"(looked for {', '.join(EXPERT_COUNT_KEYS)})")
    return key


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
    return router(block)(x)[2]


def routed_weights(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """T × E: the gate weight each token gives each expert (the router's top-k weights, 0 elsewhere):
    the weight with which the expert's output enters the block's output."""
    _, weights, indices = router(block)(x)
    dense = torch.zeros(x.shape[0], expert_count(block), dtype=torch.float32, device=x.device)
    return dense.scatter_add_(1, indices, weights.detach().to(dense))


def router_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The router's per-expert tensors (parameters and buffers whose first dimension is E)."""
    count = expert_count(block)
    tensors = dict(router(block).named_parameters(recurse=False))
    tensors.update(dict(router(block).named_buffers(recurse=False)))
    return {name: t.detach() for name, t in tensors.items() if t.ndim >= 1 and t.shape[0] == count}


def rebuild_block(block: nn.Module, weights: ExpertWeights | nn.Module, router_rows: dict[str, torch.Tensor]
                  ) -> nn.Module:
    """A copy of ``block`` with E' experts: the given expert weights (dense, fused into the block's own
    experts module) or a replacement experts module (e.g. low-rank experts) with the same forward, and
    the given router rows; shared experts, activation and routing settings are copied unchanged. The
    original block is not modified."""
    count = len(weights) if isinstance(weights, ExpertWeights) else int(weights.num_experts)
    gate = router(block)
    top_k = getattr(gate, "top_k", 1)
    if count < top_k:
        raise LrcompressError(f"cannot keep {count} experts: the router picks {top_k} per token")
    groups = getattr(gate, "num_group", None)
    if groups and (count % groups or count // groups < 2):   # DeepSeek-V3 scores a group by its top 2
        raise LrcompressError(f"cannot keep {count} experts: group-limited routing needs a multiple of "
                              f"n_group={groups} with at least 2 experts per group")
    # Deep-copy the block but share (not copy) what is about to be replaced: it may be large.
    replaced: list = [block.experts.gate_up_proj, block.experts.down_proj]
    if not isinstance(weights, ExpertWeights):
        replaced.append(block.experts)
    replaced += [getattr(gate, name) for name in router_rows]
    new = copy.deepcopy(block, memo={id(t): t for t in replaced})
    if isinstance(weights, ExpertWeights):
        dtype = block.experts.gate_up_proj.dtype
        gate_up = torch.cat([weights.gate, weights.up], dim=1).to(dtype).contiguous()
        new.experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        new.experts.down_proj = nn.Parameter(weights.down.to(dtype).contiguous(), requires_grad=False)
        new.experts.num_experts = count
    else:
        new.experts = weights
    new_gate = router(new)
    for name, tensor in router_rows.items():
        old = getattr(gate, name)
        value = tensor.to(old.dtype).contiguous()
        if isinstance(old, nn.Parameter):
            setattr(new_gate, name, nn.Parameter(value, requires_grad=False))
        else:
            new_gate.register_buffer(name, value, persistent=name not in gate._non_persistent_buffers_set)
    new_gate.num_experts = count
    return new
