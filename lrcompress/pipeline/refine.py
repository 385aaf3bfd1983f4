"""Block refinement: after a decoder layer is compressed, fit its trainable parameters so that, fed the
*compressed* model's inputs, it reproduces the *original* layer's outputs on the *original* inputs.

Objective, for decoder layer l with original inputs X (original model), compressed-stream inputs X̂
(the partly compressed, already refined model) and the original layer f, compressed layer g_θ:

    min_θ  mean over tokens and channels of (g_θ(X̂) − f(X))²

Anchoring to f(X), not f(X̂), is what lets the layer correct the error the layers before it left in X̂
as well as its own (AA-SVD, Sinha & Fleuret 2026, arXiv:2604.02119, §"block-level refinement": anchor
to the original outputs, model the input shift; SAES-SVD makes the same argument). Fitting a whole
block's output rather than each linear's is BRECQ's block reconstruction (Li et al. 2021,
arXiv:2102.05426): a block sees the interactions of its linears (attention, the gated MLP) that a
per-linear objective cannot.

Optimiser, following block-wise training of compressed weights in EfficientQAT's Block-AP (Chen et al.
2024, arXiv:2407.11062) and AQLM's block fine-tuning (Egiazarian et al. 2024, arXiv:2401.06118):
Adam on the selected parameters, a small learning rate with cosine decay to zero over all steps, a
few epochs over the calibration windows, one step per batch of captured inputs (the batches the
pipeline propagates; their size is the capture batch size), batch order reshuffled every epoch by a
seeded generator. The loss is computed in float32 (the layer is run in float32 while it is refined and
cast back afterwards); per-batch losses are summed in float64. The last ``holdout`` fraction of the
batches is never trained on: its loss before and after measures generalisation, and with
``revert_if_worse`` a refinement that makes the held-out loss worse is undone (the layer is left as
compressed), so the refinement can only help on data it did not see.

What is trained (``parameters``): ``factors`` — the two factors of every ``LowRankLinear`` and the plain
(unquantized) residual factors of every ``CompensatedLinear`` (EoRA's path; its base stays frozen);
``norms`` — every 1-D weight that is not a bias (RMSNorm/LayerNorm gains); ``biases`` — every bias.
Everything else (dense or quantized weights, rotary buffers) is frozen and left bit-identical, in its dtype.

Loss (``loss``): ``mse`` is the objective above. ``token_relative`` divides each token's squared error by
that token's mean square target, then averages over tokens: in SmolLM2's middle layers the first token
of a window carries a massive activation (≈ 98 % of the output power at layer 15, and half the squared
error, measured on two WikiText-2 calibration windows of the whiten 0.2 checkpoint), so plain MSE
spends half its effort on one token in 512; the relative form weighs every token alike (the per-token normalisation is the scale-free error that
``rel.err`` reports per module, taken per token). Measured: no better than ``mse`` (bench/RESULTS.md).
Cost and evidence on SmolLM2-135M: bench/refine.py and bench/RESULTS.md.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import nn

from ..errors import LrcompressError, NumericalError
from ..models.capture import LayerInputs
from ..modules.base import CompressedModule
from ..modules.compensated import CompensatedLinear
from ..modules.low_rank import LowRankLinear
from ..modules.sparse_dict import SparseDictLinear
from ..recipe import RefineSpec
from .memory import PeakMemory
from .records import ModuleRecord
from .reference import ReferenceStream, stream_for
from .settings import PipelineSettings
from .stream import Forward, LayerStream

if TYPE_CHECKING:
    from ..recipe import RuntimeSpec

log = logging.getLogger(__name__)


class RefineConfig(RefineSpec):
    """How one compressed decoder layer is refined (module docstring): the recipe's ``runtime.refine`` keys
    and the seed of the batch shuffle (the engine derives it from the recipe's ``seed`` and the layer)."""

    seed: int = 0


class RefineReport(BaseModel):
    """What one refinement did: the loss (``RefineConfig.loss``) of the layer's output against the original
    layer's output, before and after, on the batches trained on and on the held-out batches."""

    layer: str
    parameters: int                 # trainable values
    steps: int
    train_before: float
    train_after: float
    holdout_before: float | None
    holdout_after: float | None
    target_mean_square: float       # mean of the original outputs² (training batches): errors relative to it
    reverted: bool
    seconds: float


def trainable_parameters(layer: nn.Module, kinds: Iterable[str]) -> list[nn.Parameter]:
    """The parameters of ``layer`` the kinds select, each once, in module order. "factors" are both factors
    of a low-rank pair (a compensation's float residual included) and a sparse dictionary's atoms and
    nonzero values: the values move on their fixed support (the indices are not trainable), a dictionary
    that several modules share is one parameter. Quantized factors, values and dictionaries stay as they are."""
    kinds = set(kinds)
    chosen: dict[int, nn.Parameter] = {}
    for module in layer.modules():
        if "factors" in kinds:
            for factor in _factor_weights(module):
                chosen.setdefault(id(factor), factor)
    for name, parameter in layer.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ("biases" in kinds and leaf == "bias") or ("norms" in kinds and leaf == "weight" and parameter.dim() == 1):
            chosen.setdefault(id(parameter), parameter)
    return list(chosen.values())


def _factor_weights(module: nn.Module) -> list[nn.Parameter]:
    """The float factor tensors of one compressed module (none for any other module)."""
    if isinstance(module, (LowRankLinear, CompensatedLinear)):
        return [factor.weight for factor in (module.down, module.up) if type(factor) is nn.Linear]
    if isinstance(module, SparseDictLinear):
        return [tensor for tensor in (module.dictionary, module.values) if tensor is not None]
    return []


def _loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The float32 loss of one batch (``RefineConfig.loss``)."""
    error = (output.float() - target.float()).pow(2)
    if kind == "mse":
        return error.mean()
    target = target.float()
    return (error.mean(-1) / target.pow(2).mean(-1).clamp_min(torch.finfo(torch.float32).tiny)).mean()


@dataclass
class _Fit:
    """One layer's refinement problem: the layer, its inputs and targets per batch, where it runs."""

    layer: nn.Module
    inputs: LayerInputs
    targets: list[torch.Tensor]
    name: str
    loss: str

    @property
    def compute(self) -> torch.device:
        return next(self.layer.parameters()).device

    def batch_loss(self, number: int) -> torch.Tensor:
        compute = self.compute
        output = self.inputs.call(number).to(compute)(self.layer, self.inputs.hidden[number].to(compute, torch.float32))
        return _loss(output, self.targets[number].to(compute), self.loss)


@torch.no_grad()
def _mean_error(fit: _Fit, batches: list[int]) -> float | None:
    """The loss over ``batches`` (float64 sum of per-batch means, batches weighted by size)."""
    if not batches:
        return None
    total, count = 0.0, 0
    for number in batches:
        size = fit.targets[number].numel()
        total += float(fit.batch_loss(number).double()) * size
        count += size
    return total / count


def _mean_square(targets: list[torch.Tensor], batches: list[int]) -> float:
    return sum(float(targets[b].double().pow(2).sum()) for b in batches) / sum(targets[b].numel() for b in batches)


def _split(batches: int, holdout: float) -> tuple[list[int], list[int]]:
    """(training batches, held-out batches): the last ``round(holdout · batches)`` are held out, at least
    one when ``holdout`` > 0, never all."""
    held = 0 if holdout == 0 or batches < 2 else min(batches - 1, max(1, round(holdout * batches)))
    return list(range(batches - held)), list(range(batches - held, batches))


def refine_layer(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], config: RefineConfig,
                 name: str | None = None) -> RefineReport:
    """Refine the compressed decoder layer ``layer`` in place so that on ``inputs`` (the compressed
    model's inputs to it, with their layer calls) it reproduces ``targets`` (the original layer's outputs
    on the original inputs, one tensor per batch of ``inputs``). Returns the losses before and after.
    It runs where the layer is (a layer walk has put it on the compute device); batches are moved there."""
    started = time.perf_counter()
    name = name or f"decoder layer {inputs.layer}"
    if len(targets) != len(inputs):
        raise LrcompressError(f"refine {name}: {len(targets)} target batches for {len(inputs)} input batches")
    params = trainable_parameters(layer, config.parameters)
    if not params:
        raise LrcompressError(f"refine {name}: nothing to train for parameters={config.parameters} "
                              "(no low-rank or dictionary factors, norms or biases of that kind in the layer)")
    with Trainable(layer, params):
        fit = _Fit(layer, inputs, targets, name, config.loss)
        train, held = _split(len(inputs), config.holdout)
        train_before, held_before = _mean_error(fit, train), _mean_error(fit, held)
        snapshot = [p.detach().clone() for p in params]
        steps = _train(fit, train, params, config)
        train_after, held_after = _mean_error(fit, train), _mean_error(fit, held)
        for value in (train_after, held_after):
            if value is not None and not math.isfinite(value):
                raise NumericalError(f"refine {name}: the refined layer's output error is {value}")
        reverted = config.revert_if_worse and held_before is not None and held_after >= held_before
        if reverted:
            with torch.no_grad():
                for parameter, saved in zip(params, snapshot):
                    parameter.copy_(saved)
    return RefineReport(layer=name, parameters=sum(p.numel() for p in params), steps=steps,
                        train_before=train_before, train_after=train_after, holdout_before=held_before,
                        holdout_after=held_after, target_mean_square=_mean_square(targets, train),
                        reverted=reverted, seconds=time.perf_counter() - started)


class Trainable:
    """Inside: ``module`` (a decoder layer, or a whole model) in float32 and eval mode, only ``params`` requiring
    gradients, the inference caches of the modules that own them dropped (a cached B·A or dictionary product
    would bypass the gradients and go stale), rebuilt on exit, and a trained sparse dictionary's atoms and
    values rescaled to equal norms (``SparseDictLinear.balance_atoms``: the same product, kept after exit and
    by a revert, so that Adam's absolute step is as large for both). On exit, even
    after an error, everything as it was, the trained values cast back to their dtypes and gradients freed.
    Shared by the block refinement here and the end-to-end distillation (``pipeline.distill``)."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter]) -> None:
        self.module, self.params = module, params

    def __enter__(self) -> None:
        module = self.module
        self.dtypes = {name: t.dtype for name, t in _tensors(module)}
        self.requires = {id(p): p.requires_grad for p in module.parameters()}
        trained = {id(p) for p in self.params}
        self.prepared = [m for m in module.modules() if isinstance(m, CompressedModule) and m.inference_tensors()
                         and any(id(p) in trained for p in m.parameters())]
        for prepared in self.prepared:
            prepared.release_inference()
        self.training = module.training
        module.float().eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        for parameter in self.params:
            parameter.requires_grad_(True)
        balanced = [m.balance_atoms() for m in module.modules()
                    if isinstance(m, SparseDictLinear) and m.dictionary is not None and id(m.dictionary) in trained]
        if balanced:
            log.info("%d of %d trained dictionaries rebalanced (atoms and values to equal norms, same product)",
                     sum(balanced), len(balanced))

    def __exit__(self, *exc: object) -> None:
        for parameter in self.module.parameters():
            parameter.requires_grad_(self.requires[id(parameter)])
            parameter.grad = None
        _restore_dtypes(self.module, self.dtypes)
        for prepared in self.prepared:
            prepared.prepare_inference()
        self.module.train(self.training)


def _tensors(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(layer.named_parameters()) + list(layer.named_buffers())


def _restore_dtypes(layer: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Every parameter and buffer back in the dtype it had before ``layer.float()``: a bf16 layer returns to
    bf16, and a module that keeps some tensors in another dtype than its layer (a quantizer's float16 scales)
    keeps them so."""
    for name, tensor in _tensors(layer):
        if tensor.dtype == dtypes[name]:
            continue
        owner, _, leaf = name.rpartition(".")
        module = layer.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf].data = tensor.data.to(dtypes[name])
        else:
            module._buffers[leaf] = tensor.to(dtypes[name])


@torch.enable_grad()          # the engine walks the layers under no_grad
def _train(fit: _Fit, train: list[int], params: list[nn.Parameter], config: RefineConfig) -> int:
    """Adam with cosine decay over ``config.epochs`` passes of ``train`` (seeded shuffle); the step count."""
    total = config.epochs * len(train)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    for epoch in range(config.epochs):
        for position in torch.randperm(len(train), generator=generator).tolist():
            loss = fit.batch_loss(train[position])
            if not torch.isfinite(loss):
                raise NumericalError(f"refine {fit.name}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                                     "(non-finite inputs, targets or weights; try a smaller lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    return step



# ---------------------------------------------------------------------- the engine's option: runtime.refine
#
# With ``runtime.refine`` set, the engine refines every layer of a segment once all stages have compressed it
# and before the segment is written to the journal (so a resumed run replays the refined layer) and
# propagated. The targets are always the uncompressed model's outputs of the layer on the uncompressed
# model's inputs, f_l(X_l): under ``target: original`` the reference stream already carries them; under
# ``target: layer`` an ``AnchorStream`` carries them without changing what the stages fit.


class AnchorStream(ReferenceStream):
    """``runtime.target: layer`` with ``runtime.refine``: the uncompressed model's activations run beside the
    run (``ReferenceStream``'s untouched layer copies and reference inputs) only to give refinement its
    targets; every stage collects, is fitted and is measured exactly as under the plain ``LayerStream``."""

    needs = LayerStream.needs
    collect = LayerStream.collect
    target_members = LayerStream.target_members
    measured = LayerStream.measured
    report = LayerStream.report


def refining_stream(inputs: LayerInputs, settings: PipelineSettings, forward: Forward) -> LayerStream:
    """The run's stream: ``runtime.target``'s (``reference.stream_for``), or an ``AnchorStream`` when
    refinement needs the original activations that ``target: layer`` does not carry."""
    if settings.refine is not None and settings.target == "layer":
        return AnchorStream(inputs, settings, forward)
    return stream_for(inputs, settings, forward)


def check_refine(settings: PipelineSettings) -> None:
    """Refuse, before any work, a refinement the run cannot do."""
    if settings.refine is None:
        return
    if not settings.sequential:
        raise LrcompressError("runtime.refine needs runtime.sequential: true (a refined layer corrects the error "
                              "the compressed layers before it propagate)")
    if settings.collective.world_size > 1:
        raise LrcompressError(f"runtime.refine runs in one process; this run has {settings.collective.world_size} "
                              "(its gradients would have to be all-reduced across them): run it without --nproc")


@dataclass
class SegmentRefinement:
    """What refining a segment needs from the engine: the settings (``refine``, ``seed``, devices), the run's
    stream (a ``ReferenceStream``: the targets), the walk's forward and the decoder layers."""

    settings: PipelineSettings
    stream: LayerStream
    forward: Forward
    layers: nn.ModuleList

    def segment(self, indices: list[int], inputs: LayerInputs, touched: set[int]) -> dict[int, dict[str, Any]]:
        """Refine the layers of ``indices`` that a stage compressed (``touched``), in order, each on the
        compressed stream's inputs to it (``inputs`` for the first, the refined predecessor's outputs after);
        the layers are on the compute device. Returns layer → its report (``RefineReport`` fields, or
        ``skipped`` with the reason)."""
        reports: dict[int, dict[str, Any]] = {}
        x = inputs
        for position, index in enumerate(indices):
            if index in touched:
                reports[index] = self.layer(index, x)
            if position + 1 < len(indices):
                x = self.forward(self.layers[index], x)
        return reports

    def layer(self, index: int, inputs: LayerInputs) -> dict[str, Any]:
        """One layer: its targets from the reference stream, then ``refine_layer`` with the layer's seed."""
        spec, stream = self.settings.refine, self.stream
        if not isinstance(stream, ReferenceStream):
            raise RuntimeError("runtime.refine needs the reference stream (refining_stream) to run beside")
        started = time.perf_counter()
        layer = self.layers[index]
        if not trainable_parameters(layer, spec.parameters):
            reason = (f"nothing to train for parameters={spec.parameters}: its compressed modules hold no float "
                      "factors (quantized or pruned weights stay as compressed)")
            log.warning("runtime.refine: decoder layer %d skipped, %s", index, reason)
            return {"skipped": reason}
        config = RefineConfig(**spec.model_dump(), seed=self.settings.seed + index)
        targets = stream.inputs_for(index + 1).hidden
        with PeakMemory(self.settings.compute) as peak:
            report = refine_layer(layer, inputs, targets, config, name=f"decoder layer {index}")
        log.info("refined decoder layer %d: train %.4g -> %.4g, held-out %s -> %s%s, %.1fs", index,
                 report.train_before, report.train_after, _short(report.holdout_before),
                 _short(report.holdout_after), " (reverted)" if report.reverted else "", report.seconds)
        return {**report.model_dump(), "seconds": time.perf_counter() - started,
                "peak_memory_growth_bytes": peak.report()["peak_memory_growth_bytes"]}


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def refine_summary(spec: RefineSpec | None, records: list[ModuleRecord]) -> dict[str, Any] | None:
    """metrics.json ``refine``: the settings, each layer's report (read from its module records, where the
    engine put it and where a resumed run reads it back), and the totals: time, peak memory growth, how
    many layers were refined, reverted and skipped."""
    if spec is None:
        return None
    layers: dict[int, dict[str, Any]] = {}
    for record in records:
        if "refine" in record.details:
            layers.setdefault(record.layer, record.details["refine"])
    done = [r for r in layers.values() if "skipped" not in r]
    growth = [r["peak_memory_growth_bytes"] for r in done if r.get("peak_memory_growth_bytes") is not None]
    return {"config": spec.model_dump(), "refined_layers": len(done), "reverted_layers": sum(r["reverted"] for r in done),
            "skipped_layers": len(layers) - len(done), "seconds": round(sum(r["seconds"] for r in done), 3),
            "peak_memory_growth_bytes": max(growth, default=None),
            "layers": [{"index": index, **report} for index, report in sorted(layers.items())]}


def describe_refine(runtime: "RuntimeSpec", num_samples: int, seed: int) -> list[str]:
    """The dry run's line for ``runtime.refine`` (none when it is off): what is trained, on what, how long."""
    spec = runtime.refine
    if spec is None:
        return []
    batches = math.ceil(num_samples / runtime.batch_size)
    train, held = _split(batches, spec.holdout)
    beside = ("the output-matching reference stream" if runtime.target == "original" else
              "a reference stream run beside for it (one more layer forward per layer, one layer copy)")
    return [f"runtime.refine: after its stages, each compressed layer's {', '.join(spec.parameters)} are refined toward "
            f"the uncompressed model's outputs of that layer ({beside}): Adam lr {spec.lr:g} with cosine decay, "
            f"{spec.epochs} epochs × {len(train)} steps of {runtime.batch_size} windows, {len(held)} batch(es) held out"
            f"{' (reverted if not better)' if spec.revert_if_worse else ''}, loss {spec.loss}, shuffle seed {seed} + layer"]
