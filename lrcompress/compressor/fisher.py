"""Fisher statistics: per-input-column and per-output-row sums of squared weight gradients.

The empirical Fisher of a weight is I_ij = E_d[(∂L_d/∂W_ij)²] over calibration samples d (FWSVD,
Hsu et al., 2022). For a Linear y = x·Wᵀ one sample's weight gradient is G = gᵀx (g = ∂L_d/∂y over
the sample's tokens, x the saved inputs), so the gradient pre-pass can reduce G to its squared column
and row sums at once, without ever keeping a full-size ``.grad``. The sums are plain running totals
(``merge`` adds them), so batches and processes reduce alike; dividing by ``count`` is never needed
because FWSVD is invariant to a global scale of the importances.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NumericalError
from .stats import Statistic, accumulation_dtype


class FisherStatistic(Statistic):
    """Σ_d Σ_i (∂L_d/∂W_ij)² per input column j and Σ_d Σ_j (∂L_d/∂W_ij)² per output row i."""

    name = "fisher"

    def __init__(self, out_features: int, in_features: int, device: torch.device | str = "cpu") -> None:
        dtype = accumulation_dtype(torch.device(device))
        self.input_sums = torch.zeros(in_features, dtype=dtype, device=device)
        self.output_sums = torch.zeros(out_features, dtype=dtype, device=device)
        self.count = 0                      # calibration samples (windows) folded in

    @classmethod
    def for_module(cls, module: nn.Module, device: torch.device | str) -> "FisherStatistic":
        return cls(int(module.out_features), int(module.in_features), device)

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        raise TypeError("Fisher statistics need the output gradient: they come from the gradient "
                        "pre-pass (observe_gradient), not from forward hooks")

    def observe_gradient(self, inputs: torch.Tensor, output_grad: torch.Tensor) -> None:
        """Fold in a batch: ``inputs`` (samples, tokens, in) and ``output_grad`` (samples, tokens, out).

        Each sample's G = gᵀx is formed one at a time in float32 or wider (one m×n temporary), squared
        and reduced; a 2-D pair is one sample.
        """
        compute = torch.promote_types(inputs.dtype, torch.float32)
        x = _samples(inputs)
        g = _samples(output_grad)
        for sample_x, sample_g in zip(x, g):
            grad = sample_g.to(compute).T @ sample_x.to(compute)         # ∂L_d/∂W, out × in
            squared = grad.square_()
            self.input_sums += squared.sum(dim=0).to(self.input_sums)
            self.output_sums += squared.sum(dim=1).to(self.output_sums)
            self.count += 1

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, FisherStatistic)
        self.input_sums += other.input_sums.to(self.input_sums)
        self.output_sums += other.output_sums.to(self.output_sums)
        self.count += other.count

    def state(self) -> dict[str, torch.Tensor]:
        return {"input_sums": self.input_sums, "output_sums": self.output_sums,
                "count": torch.tensor(self.count, dtype=torch.int64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.input_sums = state["input_sums"].to(self.input_sums, copy=True)
        self.output_sums = state["output_sums"].to(self.output_sums, copy=True)
        self.count = int(state["count"])

    def input_importance(self, module_name: str) -> torch.Tensor:
        """f_j = Σ_i I_ij (up to the 1/count scale), float64, checked for NaN/Inf."""
        return _checked(self.input_sums, module_name, "input-column")

    def output_importance(self, module_name: str) -> torch.Tensor:
        """Σ_j I_ij per output row (up to the 1/count scale), float64, checked for NaN/Inf."""
        return _checked(self.output_sums, module_name, "output-row")


def _samples(t: torch.Tensor) -> torch.Tensor:
    """View as (samples, tokens, features): leading dimensions beyond the last two are samples."""
    return t[None] if t.dim() == 2 else t.reshape(-1, t.shape[-2], t.shape[-1])


def _checked(sums: torch.Tensor, module_name: str, which: str) -> torch.Tensor:
    values = sums.to(torch.float64)
    if not torch.isfinite(values).all():
        raise NumericalError(f"{module_name}: the {which} Fisher sums contain NaN/Inf (the gradient "
                             "pass overflowed; try dtype float32)")
    return values


class OutputGradientStatistic(Statistic):
    """Σ over tokens of g_j² per output feature j, g = ∂L_d/∂y: the diagonal of the output-side
    Kronecker factor G_y = E[g·gᵀ] of a K-FAC Fisher (d_out floats per module).

    The budget allocation (``pipeline.allocation``) uses it to price each whitened singular
    component by its estimated loss increase; like the Fisher sums it is a running total and only
    ever compared across modules of one run, so the 1/count scale is never needed.
    """

    name = "output_gradient"

    def __init__(self, out_features: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(out_features, dtype=accumulation_dtype(torch.device(device)), device=device)
        self.count = 0                      # tokens folded in

    @classmethod
    def for_module(cls, module: nn.Module, device: torch.device | str) -> "OutputGradientStatistic":
        return cls(int(module.out_features), device)

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        raise TypeError("output-gradient statistics come from the gradient pre-pass (observe_gradient)")

    def observe_gradient(self, inputs: torch.Tensor, output_grad: torch.Tensor) -> None:
        g = output_grad.reshape(-1, output_grad.shape[-1]).to(self.sums)
        self.sums += g.square().sum(dim=0)
        self.count += g.shape[0]

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, OutputGradientStatistic)
        self.sums += other.sums.to(self.sums)
        self.count += other.count

    def state(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "count": torch.tensor(self.count, dtype=torch.int64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sums = state["sums"].to(self.sums, copy=True)
        self.count = int(state["count"])

    def diagonal(self, module_name: str) -> torch.Tensor:
        """diag(G_y) up to the 1/count scale, float64, checked for NaN/Inf."""
        return _checked(self.sums, module_name, "output-gradient")
