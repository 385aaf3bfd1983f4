"""What Sub-MoE and its baselines need from the calibration tokens reaching an MoE block.

* routing frequencies: for each expert, the number of tokens whose top-k (chosen by the block's own
  router) includes it, and the token count;
* expert similarity: the sum over tokens of the cosine similarity between the outputs of experts i and
  j on that token, where every expert is run on every token (E × E, float64);
* REAP saliency (Lasby et al., arXiv 2510.13999): for each expert, the sum over the tokens routed to it
  of g_j(x)·‖E_j(x)‖₂ (gate weight times output norm); divided by the routed-token count it is the
  REAP score, the expert's mean router-weighted contribution to the block output;
* routed Grams (``expert_grams``, Sub-MoE†): for each expert, XᵀX of the tokens routed to it
  (the input of its gate/up projections, E × hidden × hidden) and HᵀH of its intermediate activations
  on those tokens (the input of its down projection, E × I × I), with the routed-token counts. These are
  sums, not means: an expert that gets more tokens weighs more in a whitened union SVD;
* gate-weighted routed Grams (``expert_grams_weighted``, RegMean): the same sums with every token
  weighted by the gate weight g_j(x) the router gave expert j (Σ g·x xᵀ, Σ g·h hᵀ), and the gate mass
  Σ g: a token the router sends mostly elsewhere matters little to what expert j must reproduce;
* spectrum shares (``expert_spectra``, the multi-layer allocation of ``submoe``): per weight type, the
  mean over the block's experts of σ_k(W_i)²/‖W_i‖², from the weights alone; made by a pre-pass over every
  MoE block before the first is compressed (``pipeline/expert_spectra.py``), so that each block's
  statistic can see every block's (``ExpertSpectraStatistic.table``).

Experts run on chunks of ``CHUNK_TOKENS`` tokens so that memory stays at E × chunk × (2I + hidden).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import NumericalError
from ..models.moe import (expert_count, expert_intermediate, expert_outputs, expert_weights, route,
                          routed_weights)
from .expert_merge import spectrum_shares
from .stats import STATISTICS, Statistic, accumulation_dtype

EXPERT_STATS = "expert_outputs"
EXPERT_GRAMS = "expert_grams"
EXPERT_WEIGHTED_GRAMS = "expert_grams_weighted"
EXPERT_SPECTRA = "expert_spectra"
CHUNK_TOKENS = 512
COSINE_EPS = 1e-12


class _BlockStatistic(Statistic):
    """A statistic of one MoE block that runs its experts on chunks of tokens."""

    def __init__(self, block: nn.Module, device: torch.device | str, chunk_tokens: int) -> None:
        self.block = block
        self.chunk_tokens = chunk_tokens
        self.dtype = accumulation_dtype(torch.device(device))


class ExpertStatistic(_BlockStatistic):
    name = EXPERT_STATS

    def __init__(self, block: nn.Module, device: torch.device | str = "cpu",
                 chunk_tokens: int = CHUNK_TOKENS) -> None:
        super().__init__(block, device, chunk_tokens)
        experts = expert_count(block)
        self.counts = torch.zeros(experts, dtype=torch.float64)
        self.cosine_sum = torch.zeros(experts, experts, dtype=self.dtype, device=device)
        self.reap_sum = torch.zeros(experts, dtype=torch.float64)
        self.tokens = 0

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        selected = route(self.block, x)
        self.counts += torch.bincount(selected.reshape(-1).cpu(), minlength=len(self.counts)).double()
        for chunk in x.split(self.chunk_tokens):
            out = expert_outputs(self.block, chunk).float()
            norms = out.norm(dim=-1)
            unit = out / norms[..., None].clamp_min(COSINE_EPS)
            self.cosine_sum += torch.einsum("eth,fth->ef", unit, unit).to(self.cosine_sum)
            gates = routed_weights(self.block, chunk)                 # T × E, 0 where not routed
            self.reap_sum += torch.einsum("te,et->e", gates, norms).double().cpu()
        self.tokens += x.shape[0]

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, ExpertStatistic)
        self.counts += other.counts
        self.cosine_sum += other.cosine_sum.to(self.cosine_sum)
        self.reap_sum += other.reap_sum
        self.tokens += other.tokens

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "cosine_sum": self.cosine_sum, "reap_sum": self.reap_sum,
                "tokens": torch.tensor(self.tokens, dtype=torch.int64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].to(self.counts, copy=True)
        self.cosine_sum = state["cosine_sum"].to(self.cosine_sum, copy=True)
        if "reap_sum" in state:          # states saved before REAP scores existed lack it
            self.reap_sum = state["reap_sum"].to(self.reap_sum, copy=True)
        self.tokens = int(state["tokens"])

    def reap_scores(self) -> torch.Tensor:
        """REAP: mean over the tokens routed to expert j of g_j(x)·‖E_j(x)‖₂ (0 for an unreached expert)."""
        return self.reap_sum / self.counts.clamp_min(1.0)

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


class ExpertGramStatistic(_BlockStatistic):
    """Per-expert Grams of the routed tokens: gate/up inputs and down inputs (see the module doc)."""

    name = EXPERT_GRAMS
    gate_weighted: ClassVar[bool] = False

    def __init__(self, block: nn.Module, device: torch.device | str = "cpu",
                 chunk_tokens: int = CHUNK_TOKENS) -> None:
        super().__init__(block, device, chunk_tokens)
        experts, inner, hidden = expert_weights(block).gate.shape
        self.inputs = torch.zeros(experts, hidden, hidden, dtype=self.dtype, device=device)
        self.intermediate = torch.zeros(experts, inner, inner, dtype=self.dtype, device=device)
        self.counts = torch.zeros(experts, dtype=torch.long)
        self.mass = torch.zeros(experts, dtype=torch.float64)

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        for chunk in x.split(self.chunk_tokens):
            selected = route(self.block, chunk)
            gates = routed_weights(self.block, chunk) if self.gate_weighted else None
            for index in range(len(self.counts)):
                mask = (selected == index).any(dim=1)
                routed = chunk[mask]
                if not len(routed):
                    continue
                hidden = expert_intermediate(self.block, index, routed)
                xs, hs = routed.to(self.inputs), hidden.to(self.intermediate)
                if gates is not None:
                    g = gates[mask, index]
                    self.mass[index] += float(g.double().sum())
                    root = g.sqrt()[:, None]
                    xs, hs = xs * root.to(xs), hs * root.to(hs)
                self.inputs[index].addmm_(xs.T, xs)
                self.intermediate[index].addmm_(hs.T, hs)
                self.counts[index] += len(routed)

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, ExpertGramStatistic) and other.gate_weighted == self.gate_weighted
        self.inputs += other.inputs.to(self.inputs)
        self.intermediate += other.intermediate.to(self.intermediate)
        self.counts += other.counts
        self.mass += other.mass

    def state(self) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs, "intermediate": self.intermediate, "counts": self.counts, "mass": self.mass}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inputs = state["inputs"].to(self.inputs, copy=True)
        self.intermediate = state["intermediate"].to(self.intermediate, copy=True)
        self.counts = state["counts"].to(self.counts, copy=True)
        if "mass" in state:
            self.mass = state["mass"].to(self.mass, copy=True)

    def grams(self, block_name: str, index: int) -> dict[str, torch.Tensor]:
        """{weight type: the Gram of its input} of expert ``index`` in float64, checked for NaN/Inf."""
        g_in = self.inputs[index].to(torch.float64).cpu()
        g_mid = self.intermediate[index].to(torch.float64).cpu()
        if not (torch.isfinite(g_in).all() and torch.isfinite(g_mid).all()):
            raise NumericalError(f"{block_name}: the routed-token Grams of expert {index} contain NaN/Inf")
        return {"gate": g_in, "up": g_in, "down": g_mid}


STATISTICS[EXPERT_STATS] = lambda module, device, *_: ExpertStatistic(module, device)
class WeightedExpertGramStatistic(ExpertGramStatistic):
    """The routed Grams with every token weighted by its gate weight for the expert (RegMean's Grams)."""

    name = EXPERT_WEIGHTED_GRAMS
    gate_weighted = True


STATISTICS[EXPERT_GRAMS] = lambda module, device, *_: ExpertGramStatistic(module, device)
STATISTICS[EXPERT_WEIGHTED_GRAMS] = lambda module, device, *_: WeightedExpertGramStatistic(module, device)


class ExpertSpectraStatistic(Statistic):
    """The spectrum shares of one MoE block's experts (``expert_merge.spectrum_shares``), per weight type,
    and the table of every block's.

    Weights only: nothing is observed, and every process computes the same values, so ``merge`` keeps
    its own (it checks that the other agrees). ``table`` maps each block's full name to its statistic; it
    is shared by all blocks of one pre-pass, which is what lets a block's compression know the others'.
    """

    name = EXPERT_SPECTRA

    def __init__(self, block_name: str, spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                 table: dict[str, "ExpertSpectraStatistic"]) -> None:
        self.block_name = block_name
        self.spectra = {kind: s.detach().to("cpu", torch.float64) for kind, s in spectra.items()}
        self.shapes = dict(shapes)
        self.table = table
        table[block_name] = self

    @classmethod
    def of_block(cls, block_name: str, block: nn.Module,
                 table: dict[str, "ExpertSpectraStatistic"]) -> "ExpertSpectraStatistic":
        types = expert_weights(block).types()
        return cls(block_name, {kind: spectrum_shares(w.detach()) for kind, w in types.items()},
                   {kind: (int(w.shape[1]), int(w.shape[2])) for kind, w in types.items()}, table)

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        raise TypeError("expert_spectra come from the weights (a pre-pass), not from observed tokens")

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, ExpertSpectraStatistic)
        for kind, s in self.spectra.items():
            if not torch.allclose(s, other.spectra[kind].to(s), rtol=1e-6, atol=0.0):
                raise NumericalError(f"{self.block_name}: processes disagree on the {kind} spectrum shares")

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.spectra)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.spectra = {kind: state[kind].to("cpu", torch.float64, copy=True) for kind in self.spectra}
