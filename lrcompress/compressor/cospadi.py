"""``cospadi``: CoSpaDi, calibration-guided sparse dictionary compression (Shopkhoev et al., 2025).

Paper orientation: W is d_in × d_out (the transpose of ``nn.Linear.weight``) and Y = XW. With the
damped Gram G = XᵀX + η·mean(diag G)·I = F·Fᵀ (F lower triangular, ``linalg.whitening``),
‖X(W − Ŵ)‖_F = ‖Fᵀ(W − Ŵ)‖_F, so the dictionary is learned on W_F = Fᵀ·W with K-SVD
(``dictionary.ksvd``: SVD initialization, batched OMP, rank-1 atom updates) and mapped back:
D = F⁻ᵀ·D_F. The layer computes y = (x·D)·S with S column-sparse (``SparseDictLinear``).

Choices the paper leaves open, made here:
- Budget: k = ρ·s atoms (ρ ≥ 1), s from the ratio with the indices counted at their stored size:
  bit-packed at ⌈log₂ k⌉ bits (k = 408: 9 bits, 0.28 of a float32 value, 0.56 of a bfloat16 one);
  ``count_indices: false`` leaves them out of the budget (the record still counts them: they are
  stored). Both ratios are reported in the record details.
- Pursuit: generalized OMP with min(16, ⌊s/16⌋) atoms a step (``pursuit_atoms_per_step``) instead
  of the paper's OMP (1 atom a step: ``omp_atoms_per_step: 1``): the same module errors on SmolLM2
  (0.13364 against 0.13375 on gate_proj at 16 a step, 4 iterations) at a fifth of the sparse coding's
  time (docs/cospadi.md, "Batched OMP").
- After K-SVD the values are refit by exact least squares on the final supports, in each layer's own
  (damped) metric; this can only lower the objective.
- Per-group mode (``group_size`` g > 1): the same projection of g consecutive layers shares one
  dictionary, learned on the stacked whitened weights [Fᵀ·W_1, …, Fᵀ·W_g] with F from the pooled Gram
  Σ_l G_l (one whitening is needed for one shared D = F⁻ᵀ·D_F); each layer keeps its own S, refit with
  its own Gram. The dictionary is charged 1/g to each member.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from pydantic import Field
from torch import nn

from ..modules import SparseDictLinear, dense_weight
from ..modules.sparse_dict import dictionary_shares, index_bits, index_params, sparse_dict_params
from .base import CompressResult, Compressor, GramShrinkageConfig, GroupMember, Plan, RankKnob, register
from .dictionary import KSVDResult, ksvd, refit_values, sparsity_budget
from .linalg import shrink_gram, whitening
from .stats import Statistic, gram_of

log = logging.getLogger(__name__)

GOMP_MAX_ATOMS = 16         # by default a pursuit step adds at most 16 atoms ...
GOMP_SUPPORT_SHARE = 16     # ... and at most 1/16 of a column's support


class CoSpaDiConfig(GramShrinkageConfig):
    ratio: float = Field(ge=0.0, lt=1.0, description="fraction of the module's parameters removed")
    rho: float = Field(2.0, ge=1.0, description="atoms per nonzero: k = rho·s")
    iterations: int = Field(4, ge=1, description="K-SVD iterations (sparse coding + atom update)")
    group_size: int = Field(1, ge=1, description="consecutive layers sharing one dictionary per projection")
    seed: int = Field(0, description="seeds the atoms drawn beyond the rank of the whitened weight")
    damping: float = Field(1e-4, ge=0.0, description="η in G + η·mean(diag G)·I before Cholesky")
    count_indices: bool = Field(True, description="charge the stored indices to the parameter budget")
    power_steps: int = Field(3, ge=1, description="power-iteration steps of each rank-1 atom update")
    ksvd_dtype: Literal["float64", "float32"] = Field(
        "float32", description="precision of K-SVD's sparse coding and atom updates (whitening, un-whitening and "
                               "the value refit stay in float64)")
    omp_atoms_per_step: int | None = Field(
        None, ge=1, description="atoms each step of the sparse coding adds: 1 is the paper's OMP, more is generalized "
                                "OMP; default ⌊s/16⌋, at least 1 and at most 16 (``pursuit_atoms_per_step``)")
    tolerance: float = Field(0.005, ge=0.0, description="stop K-SVD early when an iteration lowers the relative "
                                                        "error by less than this fraction (0: never)")
    sparsity: int | None = Field(None, ge=1, description="nonzeros per column s, instead of the one the ratio "
                                                         "gives (set per module by a budget allocation)")


def pursuit_atoms_per_step(sparsity: int, configured: int | None) -> int:
    """Atoms each step of the sparse coding adds: the configured count, else min(16, ⌊s/16⌋), at least 1.

    Several atoms a step read the pursuit's state once for all of them (docs/cospadi.md, "Batched
    OMP"); on SmolLM2 (s = 63–226) up to 16–32 a step gave OMP's module errors, but on a small
    synthetic module (s = 18) 4 a step raised the error by 14%. Taking at most 1/16 of the support a
    step keeps small supports on OMP itself; the cap keeps large ones close to it (at 16 a step the
    product is already a dense matrix product)."""
    if configured is not None:
        return configured
    return max(1, min(GOMP_MAX_ATOMS, sparsity // GOMP_SUPPORT_SHARE))


@dataclass(frozen=True)
class Shape:
    sparsity: int
    atoms: int
    index_cost: float       # one index in units of one value (0 when not counted)


@register("cospadi")
class CoSpaDi(Compressor):
    Config = CoSpaDiConfig
    config: CoSpaDiConfig
    needs = frozenset({"gram"})
    shrinks = True

    @property
    def takes_target(self) -> bool:
        """Dictionary learned on the whitened T, values refit in the metric X̂ᵀX̂."""
        return True

    @property
    def group_size(self) -> int:
        return self.config.group_size

    def shape_for(self, in_features: int, out_features: int, dtype: torch.dtype, members: int) -> Shape:
        """s and k for a module of this size whose dictionary is shared by ``members`` modules.

        The index width ⌈log₂ k⌉ depends on k = ρ·s, which depends on the index cost: try widths
        from 1 bit up and keep the first whose k fits it (a wider index only lowers s).
        """
        c = self.config
        if not c.count_indices:
            return self._shape(in_features, out_features, members, 0.0)
        for bits in range(1, 33):
            shape = self._shape(in_features, out_features, members, bits / (8 * dtype.itemsize))
            if index_bits(shape.atoms) <= bits:
                return shape
        raise AssertionError("a 32-bit index names every atom")

    def _shape(self, in_features: int, out_features: int, members: int, cost: float) -> Shape:
        c = self.config
        s = c.sparsity if c.sparsity is not None else sparsity_budget(in_features, out_features, c.ratio,
                                                                       c.rho, members, cost)
        return self._sized(min(s, in_features), in_features, cost)

    def _sized(self, sparsity: int, in_features: int, cost: float) -> Shape:
        """s nonzeros per column over k = ρ·s atoms (at least s)."""
        return Shape(sparsity, max(sparsity, int(self.config.rho * sparsity)), cost)

    def plan(self, module: nn.Module) -> Plan:
        return self.plan_in_group("", module, self.config.group_size, 0)

    def plan_in_group(self, name: str, module: nn.Module, members: int, position: int) -> Plan:
        """A group of ``members`` modules (the last group of layers may be short) shares one dictionary:
        s and k follow from the members' count, and the share from the position, as ``compress_group``
        computes them."""
        weight = dense_weight(module)
        shape = self.shape_for(module.in_features, module.out_features, weight.dtype, members)
        share = dictionary_shares(module.in_features, shape.atoms, members)[position]
        bias = getattr(module, "bias", None) is not None
        spec = {"kind": SparseDictLinear.kind, "in_features": module.in_features, "out_features": module.out_features,
                "atoms": shape.atoms, "sparsity": shape.sparsity, "bias": bias, "index_bits": index_bits(shape.atoms),
                "dictionary_share": share}
        # the stored indices are charged at their real size even when the budget leaves them out
        return Plan(sparse_dict_params(module.in_features, module.out_features, shape.atoms, shape.sparsity,
                                       weight.dtype, bias, share), spec=spec)

    def rank_knob(self, module: nn.Module) -> RankKnob | None:
        """The knob is s (k = ρ·s atoms): each step stores ρ·d_in dictionary values and d_out codes
        with their indices, and the price is exact (``stored``): a step that takes k across a power of
        two widens every index by a bit. A shared dictionary (group_size > 1) has no per-module knob."""
        if self.config.group_size > 1:
            return None
        d_in, d_out = module.in_features, module.out_features
        dtype = dense_weight(module).dtype
        shape = self.shape_for(d_in, d_out, dtype, 1)
        bias = getattr(module, "bias", None)

        def price(sparsity: int) -> int:
            return self.stored(d_in, d_out, sparsity, dtype)

        dense = d_in * d_out
        top, ceiling = 1, min(d_in, dense)          # the largest s that stores less than the dense matrix
        while top < ceiling:
            middle = (top + ceiling + 1) // 2
            top, ceiling = (middle, ceiling) if price(middle) < dense else (top, middle - 1)
        return RankKnob(step_params=price(shape.sparsity + 1) - price(shape.sparsity), max_rank=top,
                        rank=shape.sparsity, budget_params=(1.0 - self.config.ratio) * dense, dense_params=dense,
                        fixed_params=bias.numel() if bias is not None else 0, price=price)

    def stored(self, in_features: int, out_features: int, sparsity: int, dtype: torch.dtype) -> int:
        """Values a module at sparsity s stores without its bias (the indices at their packed width, left
        out when ``count_indices`` is false, as the uniform budget leaves them out)."""
        shape = self._sized(min(sparsity, in_features), in_features, 0.0)
        s, atoms = shape.sparsity, shape.atoms
        stored = sparse_dict_params(in_features, out_features, atoms, s, dtype, False)
        return stored if self.config.count_indices else stored - index_params(s * out_features, atoms, dtype)

    def with_rank(self, rank: int) -> "CoSpaDi":
        return type(self)(self.config.model_copy(update={"sparsity": int(rank)}))

    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        return self.compress_group([GroupMember(name, module, stats)])[0]

    learner = "ksvd"

    def learn(self, signals: torch.Tensor, shape: Shape) -> KSVDResult:
        """The dictionary and code of the whitened weights (columns of ``signals``): K-SVD + OMP."""
        c = self.config
        return ksvd(signals, shape.atoms, shape.sparsity, c.iterations, seed=c.seed, power_steps=c.power_steps,
                    dtype=getattr(torch, c.ksvd_dtype), tolerance=c.tolerance,
                    atoms_per_step=pursuit_atoms_per_step(shape.sparsity, c.omp_atoms_per_step))

    def compress_group(self, members: list[GroupMember]) -> list[CompressResult]:
        c = self.config
        first = members[0]
        weights = [dense_weight(m.module).detach() for m in members]
        d_out, d_in = weights[0].shape
        if any(w.shape != weights[0].shape for w in weights):
            raise ValueError(f"{first.name}: a dictionary group needs modules of one shape, got "
                             f"{[tuple(w.shape) for w in weights]}")
        dtype = weights[0].dtype
        grams = [shrink_gram(_gram(m), c.shrinkage) for m in members]
        label = first.name if len(members) == 1 else f"{first.name} (+{len(members) - 1} in group)"
        white = whitening(sum(grams), c.damping, label)
        factor = white.factor
        shape = self.shape_for(d_in, d_out, dtype, len(members))
        stacked = torch.cat([factor.T @ w.to(factor).T for w in weights], dim=1)       # n × g·d_out
        learned = self.learn(stacked, shape)
        dictionary = white.inverse.T @ learned.dictionary                               # D = F⁻ᵀ·D_F
        shared = nn.Parameter(dictionary.to(dtype))
        shares = dictionary_shares(d_in, shape.atoms, len(members))
        results = []
        for i, (member, weight, gram) in enumerate(zip(members, weights, grams)):
            cols = slice(i * d_out, (i + 1) * d_out)
            indices = learned.indices[:, cols]
            metric = gram + c.damping * torch.diagonal(gram).mean() * torch.eye(d_in, dtype=gram.dtype, device=gram.device)
            projected = dictionary.T @ metric
            values, failures = refit_values(projected @ dictionary, projected @ weight.to(metric).T, indices)
            module = SparseDictLinear.from_code(shared, indices, values, getattr(member.module, "bias", None),
                                                dtype, dictionary_share=shares[i])
            details = self._details(module, shape, learned, len(members), failures)
            path = f"{white.path}, {self.learner}({_iterations(learned)}" + (f", {learned.reseeded} re-seeded)" if learned.reseeded else ")")
            results.append(CompressResult(module, rank=None, numerical_path=path, details=details))
        return results

    def _details(self, module: SparseDictLinear, shape: Shape, learned, members: int, failures: int) -> dict:
        dense = module.in_features * module.out_features
        bias = module.bias.numel() if module.bias is not None else 0
        without = module.dictionary_share + module.values.numel() + bias
        return {
            "sparsity": shape.sparsity, "atoms": shape.atoms, "rho": self.config.rho, "group_members": members,
            "index_bits": index_bits(module.atoms),
            "index_accounting": (f"indices bit-packed at {index_bits(module.atoms)} bits each = "
                                 f"{index_bits(module.atoms) / (8 * module.values.element_size()):g} value; "
                                 + ("counted in the budget" if self.config.count_indices else "not in the budget")),
            "ratio_with_indices": 1 - (without + module.index_params()) / (dense + bias),
            "ratio_without_indices": 1 - without / (dense + bias),
            "ksvd_errors": [round(e, 6) for e in learned.errors],
            "omp_atoms_per_step": pursuit_atoms_per_step(shape.sparsity, self.config.omp_atoms_per_step),
            "ksvd_best_iteration": learned.best + 1,
            "ksvd_stopped_early": learned.stopped_early,
            "refit_lstsq_fallbacks": failures,
        }


def _iterations(learned: KSVDResult) -> str:
    ran = f"{len(learned.errors)} it" + (", stopped early" if learned.stopped_early else "")
    return ran if learned.best + 1 == len(learned.errors) else f"{ran}, best {learned.best + 1}"


def _gram(member: GroupMember) -> torch.Tensor:
    return gram_of(member.stats).gram(member.name)
