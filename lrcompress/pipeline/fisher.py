"""The Fisher pre-pass: squared LM-loss gradients of the target Linears, reduced to row/column sums.

For every batch of calibration windows:

1. run the decoder layers forward without a graph, keeping only each layer's input hidden states
   (gradient checkpointing at decoder-layer granularity: L+1 tensors of batch × seq × hidden);
2. from the last hidden states, the final norm and the LM head give each window's mean next-token
   loss L_d and its gradient (one window at a time, so one window's logits are alive at once);
3. sweep the layers backwards: recompute one layer with its graph from its saved input and back-
   propagate the incoming gradient through it. Forward hooks on the layer's target Linears keep
   their input x and hang a hook on their output; when the output gradient g arrives, each window's
   weight gradient G_d = g_dᵀx_d is formed, squared and reduced to column and row sums at once
   (``FisherStatistic.observe_gradient``), then dropped.

The loss of a batch is Σ_d L_d, so g restricted to window d is exactly ∂L_d/∂y: the Fisher is
per calibration sample (the paper's E_d[(∂L_d/∂W)²]) whatever ``batch_size`` is. Every parameter has
``requires_grad`` switched off for the pass (and restored), so no ``.grad`` is ever allocated and the
weights are never written. Activation memory is one decoder layer's graph plus the saved boundaries.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..compressor.fisher import FisherStatistic, OutputGradientStatistic
from ..errors import LrcompressError, NumericalError
from ..models import ArchitectureAdapter
from ..models.capture import LayerCall, capture_layer_inputs
from .memory import PeakMemory
from .observer import PipelineObserver
from .prepass import PrePassResult, register_prepass

from .settings import PipelineSettings


@contextlib.contextmanager
def frozen_for_gradients(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and ``requires_grad=False`` on every parameter; both restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(training)


GradientStatistic = Any      # a Statistic with observe_gradient(inputs, output_grad) and for_module


def _group_by_layer(model: nn.Module, adapter: ArchitectureAdapter, targets: list[str], device: torch.device,
                    factory: Callable[[nn.Module, torch.device], GradientStatistic]
                    ) -> dict[int, dict[str, GradientStatistic]]:
    """layer index → {name inside the layer: statistic}, validating every target name."""
    layers = adapter.decoder_layers(model)
    grouped: dict[int, dict[str, FisherStatistic]] = {}
    for full in targets:
        index = next((i for i in range(len(layers)) if full.startswith(adapter.layer_prefix(i) + ".")), None)
        if index is None:
            raise LrcompressError(f"gradient pre-pass: {full} is not inside a decoder layer")
        name = full[len(adapter.layer_prefix(index)) + 1:]
        module = layers[index].get_submodule(name)
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            raise LrcompressError(f"gradient pre-pass: {full} ({type(module).__name__}) is not a linear module")
        grouped.setdefault(index, {})[name] = factory(module, device)
    return grouped


def _head_gradient(model: nn.Module, adapter: ArchitectureAdapter, hidden: torch.Tensor, ids: torch.Tensor,
                   compute: torch.device) -> tuple[torch.Tensor, float]:
    """∂(Σ_d L_d)/∂h_L for a batch (one window's logits at a time) and Σ_d L_d."""
    grads, total = [], 0.0
    for window_hidden, tokens in zip(hidden, ids):
        h = window_hidden.to(compute).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = adapter.head_logits(model, h).float()
            loss = F.cross_entropy(logits[:-1], tokens[1:].to(compute))
            (grad,) = torch.autograd.grad(loss, h)
        if not torch.isfinite(loss):
            raise NumericalError("fisher pre-pass: the calibration loss is NaN/Inf")
        grads.append(grad)
        total += float(loss.detach())
    return torch.stack(grads), total


def _layer_backward(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, grad_out: torch.Tensor,
                    stats: dict[str, GradientStatistic]) -> torch.Tensor:
    """Recompute ``layer`` with its graph, back-propagate ``grad_out``, feed the target hooks; return
    the gradient with respect to the layer's input."""

    def hook_for(statistic: GradientStatistic):
        def forward_hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:  # no path from the loss: the sums stay zero
                saved = args[0].detach()
                output.register_hook(lambda grad: statistic.observe_gradient(saved, grad))
        return forward_hook

    handles = [layer.get_submodule(name).register_forward_hook(hook_for(stat)) for name, stat in stats.items()]
    x = hidden.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = call(layer, x)
            (grad_in,) = torch.autograd.grad(out, x, grad_out)
    finally:
        for handle in handles:
            handle.remove()
    return grad_in


@register_prepass("fisher")
def fisher_pass(model: nn.Module, adapter: ArchitectureAdapter, targets: list[str], windows: torch.Tensor,
                settings: "PipelineSettings", observer: PipelineObserver) -> PrePassResult:
    """Fisher row/column sums for every target module (full names) over all calibration windows."""
    return gradient_sweep(model, adapter, targets, windows, settings, observer, FisherStatistic.for_module)


@register_prepass("output_gradient")
def output_gradient_pass(model: nn.Module, adapter: ArchitectureAdapter, targets: list[str], windows: torch.Tensor,
                         settings: "PipelineSettings", observer: PipelineObserver) -> PrePassResult:
    """diag E[g·gᵀ] of every target's output gradient (the K-FAC output factor's diagonal)."""
    return gradient_sweep(model, adapter, targets, windows, settings, observer, OutputGradientStatistic.for_module,
                          label="output-gradient pass")


def gradient_sweep(model: nn.Module, adapter: ArchitectureAdapter, targets: list[str], windows: torch.Tensor,
                   settings: "PipelineSettings", observer: PipelineObserver,
                   factory: Callable[[nn.Module, torch.device], GradientStatistic],
                   label: str = "fisher pass") -> PrePassResult:
    """One statistic from ``factory`` per target module, fed (input, output gradient) by the
    backward sweep described above; not yet reduced across processes."""
    compute, offload = settings.compute, settings.offload
    grouped = _group_by_layer(model, adapter, targets, compute, factory)
    if not grouped:
        return PrePassResult({}, {"windows": len(windows), "layers_swept": 0})
    layers = adapter.decoder_layers(model)
    lowest = min(grouped, default=len(layers))
    head_modules = [model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head)]
    head_homes = [next(m.parameters(), torch.empty(0)).device for m in head_modules]
    total_loss, boundary_bytes = 0.0, 0
    with frozen_for_gradients(model), PeakMemory(compute) as peak:
        inputs = capture_layer_inputs(model, adapter, windows, settings.batch_size, compute, offload)
        for module in head_modules:
            module.to(compute)
        try:
            batches = list(zip(inputs.hidden, windows.split(settings.batch_size)))
            for number, (hidden, ids) in enumerate(batches):
                observer.phase(f"{label}: batch {number + 1}/{len(batches)}")
                calls = inputs.calls.batch(number, compute)
                boundaries = _forward_boundaries(layers, hidden, calls, compute, offload)
                boundary_bytes = max(boundary_bytes, sum(b.numel() * b.element_size() for b in boundaries))
                grad, loss = _head_gradient(model, adapter, boundaries[-1], ids, compute)
                total_loss += loss
                for index in range(len(layers) - 1, lowest - 1, -1):
                    with _on(layers[index], compute):
                        grad = _layer_backward(layers[index], boundaries[index].to(compute), calls[index], grad,
                                               grouped.get(index, {}))
                    boundaries.pop()
        finally:
            for module, home in zip(head_modules, head_homes):
                module.to(home)
    statistics = {f"{adapter.layer_prefix(i)}.{name}": stat for i, group in grouped.items()
                  for name, stat in group.items()}
    report = {"windows": len(windows), "mean_loss": total_loss / max(len(windows), 1),
              "layers_swept": len(layers) - lowest, "saved_boundaries_bytes_per_batch": boundary_bytes,
              "checkpointing": "per decoder layer (inputs kept, one layer recomputed with its graph at a time)",
              **peak.report()}
    return PrePassResult(statistics, report)


@torch.no_grad()
def _forward_boundaries(layers: nn.ModuleList, hidden: torch.Tensor, calls: list[LayerCall],
                        compute: torch.device, offload: torch.device) -> list[torch.Tensor]:
    """[h_0, ..., h_L]: the input of every decoder layer and the last output, on ``offload``."""
    boundaries = [hidden.to(offload)]
    h = hidden.to(compute)
    for layer, call in zip(layers, calls):
        with _on(layer, compute):
            h = call(layer, h)
        boundaries.append(h.to(offload))
    return boundaries


@contextlib.contextmanager
def _on(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Move a decoder layer to the compute device for the duration, then back home."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
