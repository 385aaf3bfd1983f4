"""Statistics that the pipeline accumulates per target module from its forward calls.

Every statistic is a plain object with ``observe`` (one batch) and ``merge`` (another partial sum), so
that batches and processes (``torch.distributed``) reduce with the same code. Its running state travels
between processes as named tensors (``state``/``load_state``, counts included): never pickled.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable, Mapping

import torch
from torch import nn

from ..errors import NumericalError
from ..modules import dense_weight


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU (cheap and exact enough for any calibration size), float32 on accelerators."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


class Statistic(ABC):
    """One running statistic of one module."""

    name: ClassVar[str]

    @abstractmethod
    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        """Fold in one forward call: ``inputs`` is the module's first positional input."""

    @abstractmethod
    def merge(self, other: "Statistic") -> None:
        """Add another partial statistic of the same module (another batch or another rank)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The running state as named tensors (counts as 0-d int64), for moving it between processes."""

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the running state by ``state`` (from ``state()`` of the same kind and module).

        Rebinds every field to new tensors (on this statistic's device), never writes into the old
        ones: a shallow copy of a statistic can load another process's state without touching it."""


class InputProducts:
    """XᵀX, Σx and the row count of the last input tensor seen, computed once for every Gram that observes
    that very tensor: q, k and v are called on the same normed hidden states, gate and up on the same
    input, so a layer's seven Grams need four products, not seven (the Grams are the larger part of a
    statistics pass on CPU). A hit needs the same storage, shape, strides and version counter (no in-place
    change since), and the tensor is held until ``clear`` so that its memory cannot be reused meanwhile.
    Every Gram goes through this (shared or not), so sharing never changes a bit of the result."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._held: torch.Tensor | None = None
        self._value: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def of(self, inputs: torch.Tensor, dtype: torch.dtype, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
        version = object() if inputs.is_inference() else inputs._version   # no counter: never a hit
        key = (inputs.data_ptr(), inputs.device, inputs.dtype, tuple(inputs.shape), inputs.stride(), version,
               dtype, torch.device(device))
        if self._value is None or key != self._key:
            self.clear()            # the previous product goes before the next one is made: one at a time
            x = inputs.reshape(-1, inputs.shape[-1]).to(device=device, dtype=dtype)
            self._key, self._held, self._value = key, inputs, (x.T @ x, x.sum(dim=0), x.shape[0])
        return self._value

    def clear(self) -> None:
        self._key = self._held = self._value = None


def share_products(statistics: Iterable[Statistic]) -> InputProducts:
    """One ``InputProducts`` for every Gram among ``statistics`` (the targets of one layer's pass); clear
    it when the pass is over."""
    shared = InputProducts()
    for statistic in statistics:
        if isinstance(statistic, GramStatistic):
            statistic.products = shared
    return shared


class GramStatistic(Statistic):
    """Running sums of XᵀX, of x and the row count, over every token the module sees."""

    name = "gram"

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        dtype = accumulation_dtype(torch.device(device))
        self.sum_xx = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.sum_x = torch.zeros(in_features, dtype=dtype, device=device)
        self.count = 0
        self.products: InputProducts | None = None   # shared with the Grams of modules fed the same tensor

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        products = self.products if self.products is not None else InputProducts()
        xx, x_sum, rows = products.of(inputs, self.sum_xx.dtype, self.sum_xx.device)
        self.sum_xx += xx
        self.sum_x += x_sum
        self.count += rows

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, GramStatistic)
        self.sum_xx += other.sum_xx.to(self.sum_xx)
        self.sum_x += other.sum_x.to(self.sum_x)
        self.count += other.count

    def state(self) -> dict[str, torch.Tensor]:
        return {"sum_xx": self.sum_xx, "sum_x": self.sum_x, "count": torch.tensor(self.count, dtype=torch.int64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sum_xx = state["sum_xx"].to(self.sum_xx, copy=True)
        self.sum_x = state["sum_x"].to(self.sum_x, copy=True)
        self.count = int(state["count"])

    def gram(self, module_name: str) -> torch.Tensor:
        """XᵀX in float64, checked for NaN/Inf."""
        return _finite(self.sum_xx, module_name, "calibration Gram XᵀX")

    def mean(self) -> torch.Tensor:
        return (self.sum_x / max(self.count, 1)).to(torch.float64)


class OriginalWeight(Statistic):
    """The dense weight a module had before the first stage of this run touched it.

    Not accumulated from forward calls: the pipeline builds it from the original module (see
    ``SNAPSHOTS``), so that a later stage (a compensation such as EoRA) sees W next to the W_c it
    receives. ``observe`` and ``merge`` leave it unchanged.
    """

    name = "original_weight"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        return None

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, OriginalWeight)

    def state(self) -> dict[str, torch.Tensor]:
        """Nothing to move: every process builds the snapshot from its own (identical) original module."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        return None


class PairedStatistic(Statistic):
    """A statistic of pairs: the module's input x̂ in this (compressed) run and the input x the
    uncompressed model gives the same module for the same token (``runtime.target: original``).

    The pipeline feeds it through ``observe_pair``; the one-stream ``observe`` leaves it unchanged."""

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        return None

    @abstractmethod
    def observe_pair(self, inputs: torch.Tensor, reference: torch.Tensor) -> None:
        """Fold in one forward call: ``inputs`` = X̂ (this run), ``reference`` = X (original model)."""


class CrossGramStatistic(PairedStatistic):
    """Running sums of XᵀX̂ (the cross-Gram) and XᵀX over every token, X from the uncompressed model.

    With the Gram X̂ᵀX̂ of the same module they give the output-matching target W* and the error of any
    Ŵ against the original outputs (``linalg.matched_weight``, ``linalg.matched_output_error``).
    Two more n×n sums per module, in the Gram's dtype."""

    name = "cross_gram"

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        dtype = accumulation_dtype(torch.device(device))
        self.sum_cross = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.sum_ref = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    def observe_pair(self, inputs: torch.Tensor, reference: torch.Tensor) -> None:
        if inputs.shape != reference.shape:
            raise ValueError(f"paired inputs of different shapes: {tuple(inputs.shape)} vs {tuple(reference.shape)}")
        cast = dict(device=self.sum_cross.device, dtype=self.sum_cross.dtype)
        x_hat = inputs.reshape(-1, inputs.shape[-1]).to(**cast)
        x = reference.reshape(-1, reference.shape[-1]).to(**cast)
        self.sum_cross.addmm_(x.T, x_hat)
        self.sum_ref.addmm_(x.T, x)
        self.count += x.shape[0]

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, CrossGramStatistic)
        self.sum_cross += other.sum_cross.to(self.sum_cross)
        self.sum_ref += other.sum_ref.to(self.sum_ref)
        self.count += other.count

    def state(self) -> dict[str, torch.Tensor]:
        return {"sum_cross": self.sum_cross, "sum_ref": self.sum_ref,
                "count": torch.tensor(self.count, dtype=torch.int64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sum_cross = state["sum_cross"].to(self.sum_cross, copy=True)
        self.sum_ref = state["sum_ref"].to(self.sum_ref, copy=True)
        self.count = int(state["count"])

    def cross(self, module_name: str) -> torch.Tensor:
        """XᵀX̂ in float64, checked."""
        return _finite(self.sum_cross, module_name, "cross-Gram XᵀX̂")

    def reference_gram(self, module_name: str) -> torch.Tensor:
        """XᵀX of the uncompressed model's inputs in float64, checked."""
        return _finite(self.sum_ref, module_name, "reference Gram XᵀX")

    def nbytes(self) -> int:
        return self.sum_cross.numel() * self.sum_cross.element_size() * 2


def _finite(matrix: torch.Tensor, module_name: str, what: str) -> torch.Tensor:
    m = matrix.to(torch.float64)
    if not torch.isfinite(m).all():
        raise NumericalError(f"{module_name}: the {what} contains NaN/Inf "
                             "(the activations overflowed; try dtype float32 or fewer layers)")
    return m


StatisticFactory = Callable[[nn.Module, torch.device], Statistic]

STATISTICS: dict[str, StatisticFactory] = {
    "gram": lambda module, device: GramStatistic(_in_features(module), device),
    "cross_gram": lambda module, device: CrossGramStatistic(_in_features(module), device),
}


# Statistics made from the target module *as it was before the first stage of the run* (the pipeline
# keeps that module object and calls these factories with it instead of the current one).
SNAPSHOTS: dict[str, StatisticFactory] = {
    "original_weight": lambda original, device: OriginalWeight(_original_weight(original, device)),
}


def _original_weight(module: nn.Module, device: torch.device) -> torch.Tensor:
    return dense_weight(module).detach().to(device)


def _in_features(module: nn.Module) -> int:
    features = getattr(module, "in_features", None)
    if features is None:
        raise TypeError(f"cannot collect a Gram for {type(module).__name__}: it has no in_features")
    return int(features)


def make_statistic(kind: str, module: nn.Module, device: torch.device,
                   original: nn.Module | None = None) -> Statistic:
    """A fresh statistic of ``kind`` for ``module``; snapshot kinds are built from ``original`` (the
    module before the run's first stage replaced it; ``module`` itself when no stage has yet)."""
    if kind in SNAPSHOTS:
        return SNAPSHOTS[kind](original if original is not None else module, device)
    try:
        factory = STATISTICS[kind]
    except KeyError:
        raise KeyError(f"unknown statistic {kind!r}; known: {sorted(STATISTICS) + sorted(SNAPSHOTS)}") from None
    return factory(module, device)


def gram_of(stats: Mapping[str, Statistic]) -> GramStatistic:
    """The module's Gram statistic (every stage gets one: the pipeline always collects it)."""
    statistic = stats.get("gram")
    if not isinstance(statistic, GramStatistic):
        raise KeyError("no Gram statistic was collected for this module")
    return statistic
