"""The spectra pre-pass: each target module's whitened singular values, for a budget allocation.

It walks the *uncompressed* model one decoder layer at a time, like the engine in non-sequential mode:
load the layer (from the layer store: this works in lazy mode), hook its targets with a Gram
statistic, run every calibration batch through it, reduce the Grams across processes (torchrun), and
for each target take the SVD of W·S, S the Cholesky factor of the damped Gram (``linalg.whitening``,
as ``whiten`` does). Then the Grams are dropped and the layer released. What is kept per module is
its σ_i² (min(m, n) floats) and, when output-gradient diagonals d are given, the gains
u_iᵀ·diag(d)·u_i of its left singular vectors (as many floats): kilobytes, never a Gram of another
layer. Every process computes the same decompositions from the same reduced Grams.

With G = XᵀX = S·Sᵀ and W·S = Σ σ_i u_i v_iᵀ, dropping the components beyond rank r costs
‖X(W − Ŵ_r)ᵀ‖_F² = Σ_{i>r} σ_i² (the activation-aware truncation loss of SVD-LLM); LoRD's output
moment W·G·Wᵀ has the same eigenvalues σ_i², so one spectrum serves both.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..compressor.linalg import GramMetric
from ..compressor.stats import GramStatistic, share_products
from ..errors import NumericalError
from ..modules import dense_weight
from .walk import LayerWalk, hooks


@dataclass
class ModuleSpectrum:
    """σ_i² of the whitened weight (descending) and, optionally, each component's output gain."""

    sigma2: torch.Tensor                 # float64, min(m, n)
    gain: torch.Tensor | None = None     # float64, u_iᵀ·diag(G_y)·u_i per component

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sigma2, self.gain) if t is not None)

    def truncation_loss(self, rank: int) -> float:
        """‖X(W − Ŵ_rank)ᵀ‖_F: the smallest output error any rank-``rank`` factorization reaches."""
        return float(self.sigma2[rank:].sum().clamp_min(0).sqrt())

    def scores(self) -> torch.Tensor:
        """Estimated loss increase of dropping each component: σ_i²·gain_i (σ_i² without gains)."""
        return self.sigma2 if self.gain is None else self.sigma2 * self.gain


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor, metric: GramMetric, name: str,
                      output_diagonal: torch.Tensor | None = None) -> ModuleSpectrum:
    """The spectrum of ``weight`` (out × in) in the metric of ``gram`` (in × in), in float64."""
    white = metric.whiten(gram, name)
    whitened = weight.to(white.factor) @ white.factor
    if output_diagonal is None:
        sigma = torch.linalg.svdvals(whitened)
        gain = None
    else:
        u, sigma, _ = torch.linalg.svd(whitened, full_matrices=False)
        gain = (u.square() * output_diagonal.to(u)[:, None]).sum(dim=0).cpu()
    if not torch.isfinite(sigma).all():
        raise NumericalError(f"{name}: the whitened spectrum contains NaN/Inf")
    return ModuleSpectrum(sigma.square().cpu(), gain)


@torch.no_grad()
def collect_spectra(walk: LayerWalk, targets: Mapping[int, list[str]], metrics: Mapping[str, GramMetric],
                    output_diagonals: Mapping[str, torch.Tensor] | None = None,
                    ) -> tuple[dict[str, ModuleSpectrum], dict]:
    """Spectra of every target (layer index → names inside the layer) of the uncompressed model.

    ``metrics``: per full module name, the Gram metric its compressor whitens with (default: ``GramMetric()``); ``output_diagonals``:
    per full name, diag(G_y) for the gains (optional). Returns the spectra and a report."""

    def spectrum(full: str, module: torch.nn.Module, gram: GramStatistic) -> ModuleSpectrum:
        diagonal = None if output_diagonals is None else output_diagonals.get(full)
        return whitened_spectrum(dense_weight(module).detach(), gram.gram(full), metrics.get(full, GramMetric()),
                                 full, diagonal)

    spectra, report = sweep_grams(walk, targets, spectrum, "spectra pre-pass")
    report.update(spectra_bytes=sum(s.nbytes for s in spectra.values()),
                  with_output_gradients=output_diagonals is not None)
    return spectra, report


@torch.no_grad()
def sweep_grams(walk: LayerWalk, targets: Mapping[int, list[str]],
                visit: Callable[[str, torch.nn.Module, GramStatistic], Any], label: str) -> tuple[dict[str, Any], dict]:
    """``visit(full name, module, its reduced Gram)`` for every target of the uncompressed model, one
    decoder layer at a time (at most one layer's Grams alive); returns what each visit returned and a report."""
    started = time.perf_counter()
    last = max((i for i, names in targets.items() if names), default=-1)
    results: dict[str, Any] = {}
    if last < 0:
        return results, {"seconds": 0.0, "modules": 0}
    inputs = walk.capture()
    for index, layer in walk.layers(range(last + 1)):
        walk.observer.phase(f"{label}: layer {index + 1}/{last + 1}")
        names = targets.get(index, [])
        grams = {name: GramStatistic(layer.get_submodule(name).in_features, walk.settings.compute) for name in names}

        shared = share_products(grams.values())     # q/k/v (gate/up) read one input: one product for them
        with hooks(layer, names, _observing(grams)):
            outputs = walk.forward(layer, inputs)
        shared.clear()
        grams = walk.settings.collective.reduce_statistics(grams)
        prefix = walk.adapter.layer_prefix(index)
        for name in names:
            full = f"{prefix}.{name}"
            results[full] = visit(full, layer.get_submodule(name), grams[name])
        del grams
        inputs = outputs
    return results, {"seconds": time.perf_counter() - started, "modules": len(results), "layers_swept": last + 1}


def _observing(grams: dict[str, GramStatistic]):
    """Forward hooks (one per name) feeding each target's inputs to its Gram."""
    return lambda name: lambda _module, args, output: grams[name].observe(args[0].detach(), output)
