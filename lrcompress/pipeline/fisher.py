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
from ..models.capture import LayerCall
from .memory import PeakMemory
from .prepass import PrePassResult, register_prepass
from .walk import LayerWalk, hooks, on_device


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


def _group_by_layer(walk: LayerWalk, targets: list[str], factory: Callable[[nn.Module, torch.device], GradientStatistic]
                    ) -> dict[int, dict[str, GradientStatistic]]:
    """layer index → {name inside the layer: statistic}, validating every target name."""
    adapter, layers = walk.adapter, walk.decoder_layers
    grouped: dict[int, dict[str, FisherStatistic]] = {}
    for full in targets:
        index = next((i for i in range(len(layers)) if full.startswith(adapter.layer_prefix(i) + ".")), None)
        if index is None:
            raise LrcompressError(f"gradient pre-pass: {full} is not inside a decoder layer")
        name = full[len(adapter.layer_prefix(index)) + 1:]
        module = layers[index].get_submodule(name)
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            raise LrcompressError(f"gradient pre-pass: {full} ({type(module).__name__}) is not a linear module")
        grouped.setdefault(index, {})[name] = factory(module, walk.settings.compute)
    return grouped


def _head_gradient(walk: LayerWalk, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """∂(Σ_d L_d)/∂h_L for a batch (one window's logits at a time) and Σ_d L_d."""
    model, adapter, compute = walk.model, walk.adapter, walk.settings.compute
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

    x = hidden.detach().requires_grad_(True)
    with hooks(layer, stats, lambda name: hook_for(stats[name])), torch.enable_grad():
        out = call(layer, x)
        (grad_in,) = torch.autograd.grad(out, x, grad_out)
    return grad_in


@register_prepass("fisher")
def fisher_pass(walk: LayerWalk, targets: list[str]) -> PrePassResult:
    """Fisher row/column sums for every target module (full names) over all calibration windows."""
    return gradient_sweep(walk, targets, FisherStatistic.for_module)


@register_prepass("output_gradient")
def output_gradient_pass(walk: LayerWalk, targets: list[str]) -> PrePassResult:
    """diag E[g·gᵀ] of every target's output gradient (the K-FAC output factor's diagonal)."""
    return gradient_sweep(walk, targets, OutputGradientStatistic.for_module, label="output-gradient pass")


def gradient_sweep(walk: LayerWalk, targets: list[str], factory: Callable[[nn.Module, torch.device], GradientStatistic],
                   label: str = "fisher pass") -> PrePassResult:
    """One statistic from ``factory`` per target module, fed (input, output gradient) by the
    backward sweep described above; not yet reduced across processes."""
    model, adapter, windows, settings = walk.model, walk.adapter, walk.windows, walk.settings
    compute = settings.compute
    grouped = _group_by_layer(walk, targets, factory)
    if not grouped:
        return PrePassResult({}, {"windows": len(windows), "layers_swept": 0})
    layers = walk.decoder_layers
    lowest = min(grouped, default=len(layers))
    head_modules = [model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head)]
    total_loss, boundary_bytes = 0.0, 0
    with frozen_for_gradients(model), PeakMemory(compute) as peak:
        inputs = walk.capture()
        with on_device(head_modules, compute):
            batches = list(zip(inputs.hidden, windows.split(settings.batch_size)))
            for number, (hidden, ids) in enumerate(batches):
                walk.observer.phase(f"{label}: batch {number + 1}/{len(batches)}")
                calls = inputs.calls.batch(number, compute)
                boundaries = _forward_boundaries(walk, hidden, calls)
                boundary_bytes = max(boundary_bytes, sum(b.numel() * b.element_size() for b in boundaries))
                grad, loss = _head_gradient(walk, boundaries[-1], ids)
                total_loss += loss
                for index in range(len(layers) - 1, lowest - 1, -1):
                    with walk.on_device([index]):
                        grad = _layer_backward(layers[index], boundaries[index].to(compute), calls[index], grad,
                                               grouped.get(index, {}))
                    boundaries.pop()
    statistics = {f"{adapter.layer_prefix(i)}.{name}": stat for i, group in grouped.items()
                  for name, stat in group.items()}
    report = {"windows": len(windows), "mean_loss": total_loss / max(len(windows), 1),
              "layers_swept": len(layers) - lowest, "saved_boundaries_bytes_per_batch": boundary_bytes,
              "checkpointing": "per decoder layer (inputs kept, one layer recomputed with its graph at a time)",
              **peak.report()}
    return PrePassResult(statistics, report)


@torch.no_grad()
def _forward_boundaries(walk: LayerWalk, hidden: torch.Tensor, calls: list[LayerCall]) -> list[torch.Tensor]:
    """[h_0, ..., h_L]: the input of every decoder layer and the last output, on the offload device."""
    offload = walk.settings.offload
    boundaries = [hidden.to(offload)]
    h = hidden.to(walk.settings.compute)
    for index, call in enumerate(calls):
        with walk.on_device([index]):
            h = call(walk.decoder_layers[index], h)
        boundaries.append(h.to(offload))
    return boundaries
