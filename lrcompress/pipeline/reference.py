"""Output matching (``runtime.target: original``): the uncompressed model's activations carried beside
the compressed ones, so that each module can be fitted to the original model's outputs.

In sequential mode a module normally minimises ‖X̂(W − Ŵ)ᵀ‖ on the inputs X̂ it receives in the
partly compressed model. With the switch on, the pipeline also runs every layer's untouched copy on the
uncompressed model's activations (the *reference stream*), pairs, per token, the input X a target module
gets there with the input X̂ it gets in this run, and accumulates the cross-Gram XᵀX̂ (and XᵀX) next to
the usual Gram X̂ᵀX̂ (``CrossGramStatistic``). Each stage whose compressor ``takes_target`` is then
handed W* = W·(XᵀX̂ + λsI)(X̂ᵀX̂ + λsI)⁻¹ in place of W (``linalg.matched_weight``): minimising
‖X̂(W* − Ŵ)ᵀ‖ in the damped metric is minimising ‖X̂Ŵᵀ − XWᵀ‖ (plus the ridge toward W), which lets
a layer absorb the error its predecessors introduced. Derivation and per-method notes:
docs/output-matching.md.

Cost: one more forward per layer and stage (the untouched copy on the reference batch), one untouched
copy of the current segment of layers on the compute device, the reference activations (twice the
activation memory) and two more n×n sums per target module. ``report()`` gives the measured extra time
and sizes; the run writes them to ``metrics.json`` (``output_matching``).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compressor import GroupMember, OriginalWeight, Statistic
from ..compressor.linalg import matched_output_error, matched_weight
from ..compressor.stats import CrossGramStatistic, PairedStatistic, gram_of
from ..errors import LrcompressError
from ..models.capture import LayerInputs
from ..modules import dense_weight
from .settings import PipelineSettings, Stage
from .stream import Forward, LayerStream
from .walk import hooks

log = logging.getLogger(__name__)

TARGETS = ("layer", "original")
PAIRED_KINDS = frozenset({"cross_gram"})


@dataclass
class OutputMatchingReport:
    """What output matching cost (metrics.json ``output_matching``): the reference stream's extra time,
    forwards and peak sizes, and the stages it left alone (their compressors take no target)."""

    damping: float
    extra_seconds: float
    reference_forwards: int
    peak_reference_activation_bytes: int
    peak_cross_gram_bytes_per_layer: int
    layer_copy_bytes: int
    ignored_stages: list[int] = field(default_factory=list)
    target: str = "original"
    blend: float = 1.0                    # target_blend α
    true_sequential: bool = True          # one statistics pass per input within a layer


def check_target(stages: list[Stage], settings: PipelineSettings) -> None:
    """Refuse, before any work, a target the run cannot honour."""
    if settings.target not in TARGETS:
        raise LrcompressError(f"runtime.target must be one of {', '.join(TARGETS)}, got {settings.target!r}")
    if settings.target == "layer":
        if settings.target_blend != 1.0:
            raise LrcompressError("runtime.target_blend applies to runtime.target: original only")
        return
    if not settings.sequential:
        raise LrcompressError("runtime.target: original needs runtime.sequential: true (without propagation every "
                              "layer already sees the uncompressed model's inputs)")
    if not any(stage.compressor.takes_target for stage in stages if stage.kind.matches_outputs):
        methods = ", ".join(sorted({stage.compressor.name for stage in stages})) or "none"
        raise LrcompressError(f"runtime.target: original changes nothing for these stages ({methods}): none of them "
                              "fits a target weight in the calibration metric (whiten, lord, gptq, cospadi and "
                              "eora do); remove the switch")


def stream_for(inputs: LayerInputs, settings: PipelineSettings, forward: Forward) -> LayerStream:
    """The stream ``runtime.target`` asks for, starting from the first layer's ``inputs``."""
    return ReferenceStream(inputs, settings, forward) if settings.target == "original" else LayerStream(forward)


class ReferenceStream(LayerStream):
    """The uncompressed model's inputs to each layer of the current segment, and that segment's untouched copy."""

    loads_finished_segments = True      # a replayed segment's original still runs beside, for the next layers

    def __init__(self, inputs: LayerInputs, settings: PipelineSettings, forward: Forward) -> None:
        super().__init__(forward)
        self.settings = settings
        self.inputs: dict[int, LayerInputs] = {0: inputs}      # layer index -> its reference inputs
        self.pristine: dict[int, nn.Module] = {}
        self.targets: dict[str, tuple[torch.Tensor, str]] = {}  # full name -> (W*, solve path) until recorded
        self.ignoring: set[int] = set()
        self.seconds = 0.0
        self.forwards = 0
        self.peak_activation_bytes = 0
        self.peak_statistic_bytes = 0
        self.peak_layer_copy_bytes = 0

    # ------------------------------------------------------------------ the stream
    @staticmethod
    def applies(stage: Stage) -> bool:
        """Whether the stream concerns a stage: Linear stages are fitted to and measured against the
        original model's outputs; block stages are left alone (``TargetKind.matches_outputs``)."""
        return stage.kind.matches_outputs

    def needs(self, stage: Stage) -> frozenset[str]:
        """A stage's needs and the paired statistics: every Linear stage gets the cross-Gram (its records then
        measure the error against the original model's outputs)."""
        return stage.needs | (PAIRED_KINDS if self.applies(stage) else frozenset())

    def begin(self, layers: nn.ModuleList, indices: list[int]) -> None:
        """Keep an untouched copy of the segment's layers (before any stage replaces a module)."""
        started = time.perf_counter()
        for i in indices:
            self.pristine[i] = copy.deepcopy(layers[i]).to(self.settings.compute)
        size = sum(_module_bytes(m) for m in self.pristine.values())
        self.peak_layer_copy_bytes = max(self.peak_layer_copy_bytes, size)
        self.seconds += time.perf_counter() - started

    def inputs_for(self, index: int) -> LayerInputs:
        """The uncompressed model's inputs to layer ``index`` (run through the untouched copies if needed)."""
        if index not in self.inputs:
            previous = self.inputs_for(index - 1)
            started = time.perf_counter()
            self.inputs[index] = self.forward(self.pristine[index - 1], previous)
            self.forwards += 1
            self.seconds += time.perf_counter() - started
            self._measure()
        return self.inputs[index]

    def finish(self, indices: list[int]) -> None:
        """Advance the stream past the segment and drop its copies and intermediate activations."""
        following = indices[-1] + 1
        self.inputs_for(following)
        self.inputs = {following: self.inputs[following]}
        self.pristine.clear()

    def collect(self, index: int, layer: nn.Module, names: list[str], stats: dict[str, dict[str, Statistic]],
                inputs: LayerInputs) -> LayerInputs:
        """Every batch through ``layer`` (the compressed stream), each one paired with the same batch through
        the untouched copy on the reference inputs: the paired statistics of ``names`` see (X̂, X) token by
        token. Returns the compressed stream's outputs; the reference outputs are kept for the next layer."""
        pristine, reference = self.pristine[index], self.inputs_for(index)
        stash: dict[str, torch.Tensor] = {}
        paired = {name: [s for s in stats[name].values() if isinstance(s, PairedStatistic)] for name in names}
        extra = [0.0]

        def grab(name: str):
            def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
                stash[name] = args[0].detach()
            return hook

        def pair(name: str):
            def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
                started = time.perf_counter()
                for statistic in paired[name]:
                    statistic.observe_pair(args[0].detach(), stash[name])
                extra[0] += time.perf_counter() - started
            return hook

        hidden, reference_hidden = [], []
        with hooks(pristine, names, grab), hooks(layer, names, pair):
            for batch in range(len(inputs)):
                started = time.perf_counter()
                reference_hidden.append(self._run_batch(pristine, reference, batch))
                extra[0] += time.perf_counter() - started
                hidden.append(self._run_batch(layer, inputs, batch))
                stash.clear()
        self.forwards += 1
        self.seconds += extra[0]
        self.inputs.setdefault(index + 1, reference.following(reference_hidden))
        self._measure()
        size = sum(s.nbytes() for kinds in paired.values() for s in kinds if isinstance(s, CrossGramStatistic))
        self.peak_statistic_bytes = max(self.peak_statistic_bytes, size)
        return inputs.following(hidden)

    def _run_batch(self, layer: nn.Module, inputs: LayerInputs, batch: int) -> torch.Tensor:
        """One batch through ``layer`` on the compute device; the output back on the offload device."""
        s = self.settings
        return inputs.call(batch).to(s.compute)(layer, inputs.hidden[batch].to(s.compute)).to(s.offload)

    # ------------------------------------------------------------------ targets and records
    def target_members(self, stage: Stage, members: list[GroupMember], originals: list[nn.Module]
                       ) -> list[GroupMember]:
        """The members a stage compresses: with W* in place of W when the compressor takes a target.

        W* replaces the ``original_weight`` snapshot (a compensation's reference), and the module itself when
        no earlier stage has touched it (a stand-in ``nn.Linear`` holding W*, bias kept); a module an
        earlier stage already replaced is handed over as it is. Block stages get their members unchanged."""
        if not self.applies(stage):
            return members
        if not stage.compressor.takes_target:
            if stage.index not in self.ignoring:
                self.ignoring.add(stage.index)
                log.warning("stage %d (%s) does not fit a target weight in the calibration metric: "
                            "runtime.target: original leaves it alone (its records still measure the error "
                            "against the original model's outputs)", stage.index, stage.compressor.name)
            return members
        started = time.perf_counter()
        targeted = []
        for member, original in zip(members, originals):
            weight = dense_weight(original).detach()
            matched, path = matched_weight(weight, gram_of(member.stats).gram(member.name),
                                           _cross(member.stats).cross(member.name), self.settings.target_damping,
                                           member.name)
            self.targets[member.name] = (matched, path)     # the floor, whatever fraction of it is chased
            target = blended_target(weight, matched, self.settings.target_blend)
            stats = dict(member.stats)
            if "original_weight" in stats:
                stats["original_weight"] = OriginalWeight(target)
            module = _stand_in(original, target) if member.module is original else member.module
            targeted.append(GroupMember(member.name, module, stats))
        self.seconds += time.perf_counter() - started
        return targeted

    def measured(self, stage: Stage, member: GroupMember, original: nn.Module, replacement: nn.Module,
                 error: float) -> tuple[float, dict[str, Any]]:
        """Linear stages: the error against the original model's outputs (``record``); blocks: unchanged."""
        if not self.applies(stage):
            return error, {}
        approx = dense_weight(replacement).detach()
        weight = dense_weight(original).detach().to(approx.device)
        return self.record(member.name, weight, approx, member.stats, error)

    def record(self, name: str, weight: torch.Tensor, approx: torch.Tensor, stats, local_error: float
               ) -> tuple[float, dict[str, Any]]:
        """The record's error against the original model's outputs, ‖X̂Ŵᵀ − XWᵀ‖/‖XWᵀ‖, and details: the
        error on this run's inputs alone, and the best error any weight reaches (that of W*)."""
        started = time.perf_counter()
        cross = _cross(stats)
        grams = (gram_of(stats).gram(name).to(weight.device), cross.cross(name).to(weight.device),
                 cross.reference_gram(name).to(weight.device))
        error = matched_output_error(weight, approx, *grams)
        details: dict[str, Any] = {"target": "original", "error_vs_own_inputs": local_error}
        if name in self.targets:
            target, path = self.targets.pop(name)
            details["target_error"] = matched_output_error(weight, target.to(weight.device), *grams)
            details["target_path"] = path
        else:
            details["target"] = "layer (method ignores runtime.target)"
        self.seconds += time.perf_counter() - started
        return error, details

    def report(self) -> OutputMatchingReport:
        return OutputMatchingReport(damping=self.settings.target_damping, blend=self.settings.target_blend,
                                    true_sequential=self.settings.passes_within_layer,
                                    extra_seconds=round(self.seconds, 3),
                                    reference_forwards=self.forwards,
                                    peak_reference_activation_bytes=self.peak_activation_bytes,
                                    peak_cross_gram_bytes_per_layer=self.peak_statistic_bytes,
                                    layer_copy_bytes=self.peak_layer_copy_bytes, ignored_stages=sorted(self.ignoring))

    def _measure(self) -> None:
        size = sum(t.numel() * t.element_size() for inputs in self.inputs.values() for t in inputs.hidden)
        self.peak_activation_bytes = max(self.peak_activation_bytes, size)


def blended_target(weight: torch.Tensor, matched: torch.Tensor, blend: float) -> torch.Tensor:
    """T = W + α·(W* − W): the fraction α of the output-matching correction (``runtime.target_blend``).

    Fitting T in the metric X̂ᵀX̂ fits the outputs (1 − α)·X̂Wᵀ + α·XWᵀ (the part of XWᵀ outside the span of
    X̂ is out of every weight's reach), so α = 1 is the full objective, α = 0 the layer-wise one. GPTAQ's
    implementation scales its asymmetric correction the same way (α = 0.25 by default) and QEP calls it the
    propagation strength; docs/output-matching.md says why the full correction hurts low rank."""
    if blend == 1.0:
        return matched
    w = weight.to(matched)
    return w + blend * (matched - w)


def _cross(stats) -> CrossGramStatistic:
    statistic = stats.get("cross_gram")
    if not isinstance(statistic, CrossGramStatistic):
        raise KeyError("no cross-Gram was collected for this module (runtime.target: original)")
    return statistic


def _stand_in(original: nn.Module, target: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding the target weight (in the original's dtype) and the original's bias."""
    weight = dense_weight(original).detach()
    bias = getattr(original, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                       device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(target.to(weight))
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return linear


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
