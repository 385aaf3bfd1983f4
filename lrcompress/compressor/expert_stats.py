"""What Sub-MoE and its baselines need from the calibration tokens reaching an MoE block.

* routing frequencies: for each expert, the number of tokens whose top-k (chosen by the block's own
  router) includes it, and the token count;
* expert similarity: the sum over tokens of the cosine similarity between the outputs of experts i and
  j on that token, where every expert is run on every token (E × E, float64).

Experts run on chunks of ``CHUNK_TOKENS`` tokens so that memory stays at E × chunk × (2I + hidden).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NumericalError
from ..models.moe import expert_count, expert_outputs, route
from .stats import STATISTICS, Statistic, accumulation_dtype

EXPERT_STATS = "expert_outputs"
CHUNK_TOKENS = 512
COSINE_EPS = 1e-12


class ExpertStatistic(Statistic):
    name = EXPERT_STATS

    def __init__(self, block: nn.Module, device: torch.device | str = "cpu",
                 chunk_tokens: int = CHUNK_TOKENS) -> None:
        self.block = block
        self.chunk_tokens = chunk_tokens
        experts = expert_count(block)
        dtype = accumulation_dtype(torch.device(device))
        self.counts = torch.zeros(experts, dtype=torch.float64)
        self.cosine_sum = torch.zeros(experts, experts, dtype=dtype, device=device)
        self.tokens = 0

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        selected = route(self.block, x)
        self.counts += torch.bincount(selected.reshape(-1).cpu(), minlength=len(self.counts)).double()
        for chunk in x.split(self.chunk_tokens):
            out = expert_outputs(self.block, chunk).float()
            unit = out / out.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
            self.cosine_sum += torch.einsum("eth,fth->ef", unit, unit).to(self.cosine_sum)
        self.tokens += x.shape[0]

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, ExpertStatistic)
        self.counts += other.counts
        self.cosine_sum += other.cosine_sum.to(self.cosine_sum)
        self.tokens += other.tokens

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "cosine_sum": self.cosine_sum,
                "tokens": torch.tensor(self.tokens, dtype=torch.int64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].to(self.counts, copy=True)
        self.cosine_sum = state["cosine_sum"].to(self.cosine_sum, copy=True)
        self.tokens = int(state["tokens"])

    def frequencies(self) -> torch.Tensor:
        """f_i: share of the tokens whose top-k includes expert i (float64)."""
        return self.counts / max(self.tokens, 1)

    def similarity(self, block_name: str) -> torch.Tensor:
        """Mean over tokens of the cosine similarity of expert outputs (E × E, float64, checked)."""
        if self.tokens == 0:
            raise ValueError(f"{block_name}: no calibration token reached this MoE block")
        s = (self.cosine_sum / self.tokens).to(torch.float64).cpu()
        if not torch.isfinite(s).all():
            raise NumericalError(f"{block_name}: the expert outputs contain NaN/Inf on the calibration tokens")
        return s


STATISTICS[EXPERT_STATS] = lambda module, device, *_: ExpertStatistic(module, device)
