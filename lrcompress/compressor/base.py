"""The compressor contract: a config schema, the statistics it needs, and ``compress``.

A compressor never loads models, reads files or prints: it gets one module and its statistics and
returns the replacement. The pipeline measures time and output error and keeps the record.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .linalg import low_rank_params, target_rank
from .stats import Statistic


class CompressorConfig(BaseModel):
    """Options of one compression stage; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class GramShrinkageConfig(CompressorConfig):
    """The option of every method that fits a module in the metric of its calibration Gram."""

    shrinkage: float = Field(0.0, ge=0.0, le=1.0, description="α in (1−α)·G + α·Diag(G): distrust the calibration "
                                                              "Gram's correlations (linalg.shrink_gram)")


class LowRankConfig(CompressorConfig):
    """Target size of a low-rank factorization: a parameter ``ratio`` removed, or an explicit ``rank``."""

    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of the module's parameters removed")
    rank: int | None = Field(None, ge=1, description="explicit rank (instead of ratio)")

    @model_validator(mode="after")
    def _one_size(self) -> "LowRankConfig":
        if (self.ratio is None) == (self.rank is None):
            raise ValueError("give exactly one of 'ratio' or 'rank'")
        return self

    def rank_for(self, out_features: int, in_features: int) -> int:
        return target_rank(out_features, in_features, self.rank, self.ratio)


@dataclass
class CompressResult:
    """The replacement module and what the compressor knows about how it got there."""

    module: nn.Module
    rank: int | None = None
    numerical_path: str = "n/a"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What a compressor will produce for a module, known before any statistics (for --dry-run)."""

    params_after: int
    rank: int | None = None
    bytes_after: int | None = None     # when it differs from params_after × the weight's element size
    # The spec of the module the stage writes, where a later ``apply_to: factors`` stage needs its shape
    # (a low-rank pair, a dictionary); None where no later stage can act on its factors.
    spec: dict[str, Any] | None = None


@dataclass(frozen=True)
class RankKnob:
    """What a compressor's size knob (a rank, a sparsity) costs for one module, for budget allocation.

    The stored parameters are ``fixed_params + params(rank)``: ``rank·step_params`` for a knob whose
    every step costs the same (a rank-r factorization), or the method's own ``price`` where steps
    differ (CoSpaDi: the width of every stored index grows when the dictionary crosses a power of
    two). The stage's own setting (its ratio or rank) would give ``rank`` and corresponds to
    ``budget_params`` (the unrounded allowance of the rank-dependent part: (1 − ratio)·m·n for a
    ratio). ``max_rank`` is the largest rank worth storing (for a low-rank factorization, the rank at
    which it stops being smaller than the dense matrix). With a ``price``, ``step_params`` is the
    price of a step at the method's own rank (what reports show).
    """

    step_params: int
    max_rank: int
    rank: int
    budget_params: float
    dense_params: int
    fixed_params: int = 0
    price: Callable[[int], int] | None = field(default=None, compare=False, repr=False)

    def params(self, rank: int) -> int:
        """The rank-dependent stored parameters at ``rank`` (exact: what the finished module stores)."""
        return rank * self.step_params if self.price is None else self.price(rank)


@dataclass
class GroupMember:
    """One module of a group compressed together (same relative name in consecutive layers)."""

    name: str
    module: nn.Module
    stats: Mapping[str, Statistic]


class Compressor(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[CompressorConfig]] = CompressorConfig
    needs: ClassVar[frozenset[str]] = frozenset()
    # The method exists to make a module smaller (low-rank, dictionaries): a plan that does not is refused
    # unless the stage allows it. Not so for a compensation path (EoRA adds parameters by design) or a
    # quantizer (same parameter count, fewer bytes).
    shrinks: ClassVar[bool] = False

    def __init__(self, config: CompressorConfig) -> None:
        self.config = config

    @property
    def group_size(self) -> int:
        """Consecutive decoder layers whose modules of one kind are compressed together (1: alone).

        With a size g > 1 the pipeline collects the statistics of g layers before calling
        ``compress_group`` once per module kind (e.g. ``mlp.down_proj``) with the g members."""
        return 1

    @property
    def takes_target(self) -> bool:
        """Whether ``runtime.target: original`` may hand this compressor the output-matching target W*
        in place of the original W (as the module's weight when no earlier stage touched the module, and
        as the ``original_weight`` snapshot): true when the result minimises ‖X̂(T − Ŵ)ᵀ‖ in the metric of
        the Gram X̂ᵀX̂ it receives, for the weight T it is given. Data-free and weight-space methods keep
        False and the switch leaves them alone (docs/output-matching.md)."""
        return False

    @property
    def acts_on_factors(self) -> bool:
        """Whether this stage quantizes the factors an earlier stage made (``apply_to: factors``) instead
        of replacing the module: its plan then comes from the earlier plan's spec (``plan_factors``)."""
        return False

    def plan_factors(self, name: str, spec: dict[str, Any] | None, dtype: Any) -> Plan:
        """The plan of an ``acts_on_factors`` stage for the module that the earlier stages planned as ``spec``
        (None: no earlier stage replaced it); absolute sizes of the whole module."""
        raise NotImplementedError(f"{self.name} does not act on factors")

    def compress_group(self, members: list[GroupMember]) -> list[CompressResult]:
        """Compress modules that share something (a dictionary); by default each one alone."""
        return [self.compress(m.name, m.module, m.stats) for m in members]

    @abstractmethod
    def plan(self, module: nn.Module) -> Plan:
        """Shape of the result without statistics."""

    def plan_for(self, name: str, module: nn.Module) -> Plan:
        """The plan of the module named ``name`` (a budget allocation may give each module its own)."""
        return self.plan(module)

    def plan_in_group(self, name: str, module: nn.Module, members: int, position: int) -> Plan:
        """The plan of ``module``, member ``position`` of a group of ``members`` compressed together
        (``group_size`` > 1; the last group of layers may hold fewer); by default the group changes nothing."""
        return self.plan_for(name, module)

    def method_for(self, name: str) -> str:
        """The method that compresses the module named ``name`` (records and plans name it; a byte budget's
        stage gives each module its own)."""
        return self.name

    def rank_knob(self, module: nn.Module) -> RankKnob | None:
        """The price of this method's size knob for ``module``; None: no knob a budget can move."""
        return None

    def with_rank(self, rank: int) -> "Compressor":
        """A copy of this compressor that gives every module ``rank`` (its knob's unit)."""
        raise NotImplementedError(f"{self.name} has no rank knob")

    @abstractmethod
    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> CompressResult:
        """Return the replacement for ``module`` (named ``name``, for messages)."""


class LowRankCompressor(Compressor):
    """Shared planning for methods whose output is a rank-r ``LowRankLinear``."""

    Config = LowRankConfig
    config: LowRankConfig
    shrinks = True

    def plan(self, module: nn.Module) -> Plan:
        m, n = module.out_features, module.in_features
        rank = self.config.rank_for(m, n)
        bias = getattr(module, "bias", None)
        spec = {"kind": "low_rank", "in_features": n, "out_features": m, "rank": rank, "bias": bias is not None}
        return Plan(low_rank_params(m, n, rank) + (bias.numel() if bias is not None else 0), rank, spec=spec)

    def rank_knob(self, module: nn.Module) -> RankKnob:
        m, n = module.out_features, module.in_features
        bias = getattr(module, "bias", None)
        c = self.config
        budget = (c.rank * (m + n)) if c.rank is not None else (1.0 - (c.ratio or 0.0)) * m * n
        # Beyond m·n/(m+n) the two factors store more than the dense matrix.
        return RankKnob(step_params=m + n, max_rank=max(1, min(m, n, (m * n) // (m + n))),
                        rank=self.plan(module).rank, budget_params=float(budget), dense_params=m * n,
                        fixed_params=bias.numel() if bias is not None else 0)

    def with_rank(self, rank: int) -> "LowRankCompressor":
        return type(self)(self.config.model_copy(update={"rank": int(rank), "ratio": None}))


COMPRESSORS: dict[str, type[Compressor]] = {}


def register(name: str):
    """Class decorator: make a compressor available to recipes under ``name``."""

    def wrap(cls: type[Compressor]) -> type[Compressor]:
        if name in COMPRESSORS:
            raise ValueError(f"compressor {name!r} registered twice")
        cls.name = name
        COMPRESSORS[name] = cls
        return cls

    return wrap


def get_compressor(name: str) -> type[Compressor]:
    try:
        return COMPRESSORS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(COMPRESSORS))}") from None
