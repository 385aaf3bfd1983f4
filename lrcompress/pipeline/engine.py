"""The layer-wise engine: capture, per-layer statistics, compression, propagation.

For each decoder layer: move it to the compute device; for each stage, hook the stage's targets,
run every batch to accumulate their statistics, compress them and swap the replacements in; then run
the batches once more through the (now compressed) layer to produce the next layer's inputs
(sequential mode), or reuse the outputs of the uncompressed layer (``sequential: false``). The engine
knows compressors only through their contract; it never branches on a method name. Linear targets
and block targets (e.g. MoE layers) take the same path; ``Stage.kind`` answers what differs (selection,
statistics, output error, config updates; ``pipeline.targets``, ``pipeline.blocks``).

Compressors return replacements and never modify the module they get, so the engine keeps each
target's module as it was before the first stage of the run touched it ("original"): snapshot
statistics (``SNAPSHOTS``, e.g. ``original_weight`` for a compensation stage) are built from it, and
every record's output error is measured against the original weight.

Segments and groups: a compressor whose ``group_size`` is g > 1 compresses the same module (relative
name) of g consecutive layers together. The engine walks segments of consecutive layers (as long as the
largest group size of the stages; one layer when every size is 1), each compressed, written and resumed
as a unit; per stage it runs a group's layers one after the other, collecting every layer's statistics
with its predecessors in the group still uncompressed by that stage (a group cannot be compressed
before all of its statistics exist), calls ``compress_group`` per module name, and only then re-runs
the group from its input through the compressed layers, so that the layers *after* the group see
compressed inputs: sequential mode holds between groups, not inside one. With every group size 1
this is exactly the plain per-layer flow.

Several processes (``torchrun``): each one runs its shard of the windows; the engine reduces the
statistics at the end of every collection pass and spreads a group's decompositions through
``settings.collective`` (``pipeline.distributed``), so every process swaps in the same replacements.
Out-of-memory errors name the layer and module (``pipeline.oom``).

Output matching (``runtime.target: original``): the uncompressed model's activations run beside the
compressed ones (``pipeline.reference``); the statistics passes pair them token by token, each stage whose
compressor takes a target weight is handed W* instead of W, and records measure the error against the
original model's outputs. The engine sees it only through its stream (``pipeline.stream``): the default
stream changes nothing.

Block refinement (``runtime.refine``): once every stage has compressed a segment, each of its compressed
layers is refined toward the uncompressed model's outputs of that layer (``pipeline.refine``; the targets
come from the reference stream, which runs beside the run for it under ``target: layer`` too), before the
segment is committed to the journal and propagated: the next layer is compressed on the refined layer's
outputs.

The walk itself (capture, load, move to the device, hook, forward, move back, release) is
``pipeline.walk``'s, shared with the pre-passes and streamed evaluation.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..compressor import CompressResult, GroupMember, Statistic, make_statistic
from ..compressor.stats import share_products
from ..errors import LrcompressError, NumericalError
from ..models.capture import LayerInputs
from ..modules import dense_weight, storage_bytes, stored_params
from ..modules.surgery import replace_submodule
from .blocks import check_coverage
from .distributed import CompressJob, run_locally
from .journal import MemoryJournal, SegmentJournal
from .observer import PlannedWork
from .oom import naming_out_of_memory
from .passes import input_groups
from .prepass import is_prepass_kind
from .records import ModuleRecord
from .reference import check_target
from .refine import SegmentRefinement, check_refine, refining_stream
from .settings import Stage
from .stream import LayerStream
from .targets import is_linear_like
from .walk import LayerWalk, hooks


@dataclass
class Segment:
    """One segment's state while its stages run: its layers, each stage's targets in them, every target as it
    was before the first stage touched it ("original"), and the records so far."""

    indices: list[int]
    layers: nn.ModuleList
    prefixes: dict[int, str]
    plans: dict[tuple[int, int], list[str]]          # (stage index, layer index) -> target names in the layer
    originals: dict[tuple[int, str], nn.Module] = field(default_factory=dict)   # (layer, name) -> module
    records: list[ModuleRecord] = field(default_factory=list)


@dataclass
class Replacement:
    """One target's compression outcome, before it is swapped in."""

    layer: int
    name: str                   # inside the layer
    member: GroupMember
    result: CompressResult
    seconds: float


class LayerwisePipeline:
    def __init__(self, walk: LayerWalk, stages: list[Stage], *,
                 precomputed: Mapping[str, Mapping[str, Statistic]] | None = None,
                 journal: SegmentJournal | None = None) -> None:
        """``walk``: the model, its calibration windows, the settings, the observer and the layer store.
        ``precomputed``: full module name → {kind: Statistic} for the kinds that come from a pre-pass (see
        ``pipeline.prepass``); they are handed to the compressor with the forward ones. ``journal``: where
        finished segments are recorded (default: nowhere)."""
        self.walk, self.stages = walk, stages
        self.model, self.adapter, self.settings, self.observer = walk.model, walk.adapter, walk.settings, walk.observer
        self.journal: SegmentJournal = journal or MemoryJournal()
        self.precomputed = precomputed or {}
        self.config_updates: dict[str, tuple] = {}     # config key -> (value, module that set it)
        self.stream: LayerStream = LayerStream(walk.forward)   # until run() knows the first layer's inputs

    def segment_size(self) -> int:
        """Layers handled together: the largest group size; every other size must divide it."""
        sizes = {stage.group_size for stage in self.stages} or {1}
        size = max(sizes)
        if any(size % other for other in sizes):
            raise ValueError(f"stage group sizes {sorted(sizes)} must all divide the largest one")
        return size

    @torch.no_grad()
    def run(self) -> list[ModuleRecord]:
        """Each segment: its original weights come from the layer store, it is compressed and committed
        to the journal (or, when a resumed run finds it finished there, its records are read back),
        restored from the journal, then the calibration inputs go through it to the next segment."""
        s, walk = self.settings, self.walk
        size = self.segment_size()
        check_coverage(self.model, self.adapter, self.stages)
        check_target(self.stages, s)
        check_refine(s)
        self.observer.phase(f"capturing the decoder layers' inputs for {len(walk.windows)} windows")
        inputs = walk.capture()
        self.stream = refining_stream(inputs, s, walk.forward)
        layers = walk.decoder_layers
        records: list[ModuleRecord] = []
        self.observer.layers_started(len(layers))
        self.observer.work_planned(self._planned_work(layers))

        def loads(indices: list[int]) -> bool:        # the original: to compress it, replay it or run it beside
            return not (self.journal.finished(indices) and s.sequential) or self.stream.loads_finished_segments
        for indices in walk.segments(size, loads):
            started = time.perf_counter()
            resumed = self.journal.finished(indices)
            outputs: LayerInputs | None = None
            self.stream.begin(layers, indices)
            if resumed:
                self.observer.phase(f"layers {indices[0]}-{indices[-1]}: finished in an earlier run, replaying")
                segment_records = self.journal.records(indices)
                if not s.sequential:           # the next segment's inputs come from the uncompressed one
                    outputs = self._propagate(indices, inputs)
            else:
                with walk.on_device(indices):
                    segment_records, outputs = self._compress_segment(indices, inputs)
                    self._refine(indices, inputs, segment_records)
                self.journal.commit(self.model, indices, segment_records)
            self.journal.restore(self.model, indices)
            if outputs is None:
                outputs = self._propagate(indices, inputs)
            self.stream.finish(indices)
            records.extend(segment_records)
            inputs = outputs
            seconds = time.perf_counter() - started
            for i in indices:
                self.observer.layer_done(i, seconds / len(indices))
        self.observer.finished()
        return records

    def _refine(self, indices: list[int], inputs: LayerInputs, records: list[ModuleRecord]) -> None:
        """``runtime.refine``: each compressed layer of the segment refined toward the uncompressed model's
        outputs (``pipeline.refine``); its report goes into the details of the layer's module records, which
        the journal keeps with the segment (a resumed run reads them back)."""
        if self.settings.refine is None:
            return
        touched = {record.layer for record in records}
        self.observer.phase(f"layers {indices[0]}-{indices[-1]}: refining the compressed layers toward the "
                            "original model's outputs")
        refinement = SegmentRefinement(self.settings, self.stream, self.walk.forward, self.walk.decoder_layers)
        reports = refinement.segment(indices, inputs, touched)
        for record in records:
            record.details["refine"] = reports[record.layer]

    def _planned_work(self, layers) -> list[PlannedWork]:
        """Every target module's size (parameters, read from the skeleton: no weight is loaded), for the ETA."""
        return [PlannedWork(i, stage.index, sum(p.numel() for p in layer.get_submodule(name).parameters()))
                for i, layer in enumerate(layers) for stage in self.stages
                for name in stage.select(layer, self.adapter.layer_prefix(i))]

    def _propagate(self, indices: list[int], inputs: LayerInputs) -> LayerInputs:
        """The segment's outputs for ``inputs``, each layer on the compute device and back."""
        for i in indices:
            with self.walk.on_device([i]):
                inputs = self.walk.forward(self.walk.decoder_layers[i], inputs)
        return inputs

    def _compress_segment(self, indices: list[int], inputs: LayerInputs
                          ) -> tuple[list[ModuleRecord], LayerInputs | None]:
        """Run every stage on these layers; return the records and, in non-sequential mode, the
        outputs of the uncompressed segment (computed during the first statistics pass, for free)."""
        layers = self.walk.decoder_layers
        prefixes = {i: self.adapter.layer_prefix(i) for i in indices}
        plans = {(stage.index, i): stage.select(layers[i], prefixes[i]) for stage in self.stages for i in indices}
        segment = Segment(indices, layers, prefixes, plans)
        for i in indices:
            self.observer.layer_started(i, sum(len(plans[(stage.index, i)]) for stage in self.stages))
        uncompressed_outputs: LayerInputs | None = None
        for stage in self.stages:
            for i in indices:
                for name in plans[(stage.index, i)]:
                    segment.originals.setdefault((i, name), layers[i].get_submodule(name))
            if not any(plans[(stage.index, i)] for i in indices):
                continue
            first_pass = not self.settings.sequential and not segment.records   # the segment is still intact
            outputs = self._run_stage(segment, stage, inputs, first_pass)
            if first_pass:
                uncompressed_outputs = outputs
        return segment.records, uncompressed_outputs

    def _run_stage(self, segment: Segment, stage: Stage, inputs: LayerInputs, first_pass: bool) -> LayerInputs:
        """One stage over the segment, group by group; returns the last group's outputs as its first statistics
        pass saw them (the intact segment's outputs when this is the segment's first stage)."""
        groups = _chunks(segment.indices, stage.group_size)
        x = inputs
        for number, group in enumerate(groups):
            last_group = number + 1 == len(groups)
            group_outputs = self._run_group(segment, stage, group, x, keep=not last_group or first_pass)
            if self.settings.sequential and not last_group:     # the next group sees this one compressed
                for i in group:
                    x = self.walk.forward(segment.layers[i], x)
            else:
                x = group_outputs
        return x

    def _run_group(self, segment: Segment, stage: Stage, group: list[int], inputs: LayerInputs, keep: bool
                   ) -> LayerInputs:
        """Every statistics pass of ``stage`` over ``group`` (each followed by its compression); returns the
        group's outputs from the first pass (the group as it was), or ``inputs`` when nobody needs them
        (``keep`` false: the last group of a stage that is not the segment's first)."""
        group_outputs = inputs
        for step, plan in enumerate(self._passes(segment, stage, group, inputs)):
            x, collected = inputs, {}
            for position, i in enumerate(group):
                collected[i], outputs = self._collect(segment, stage, i, plan[(stage.index, i)], x)
                if position + 1 < len(group) or (step == 0 and keep):
                    x = outputs
                del outputs
            if step == 0:                           # the first pass sees the intact group
                group_outputs = x
            segment.records.extend(self._compress_group(segment, stage, group, plan, collected))
        return group_outputs

    def _passes(self, segment: Segment, stage: Stage, group: list[int], inputs: LayerInputs) -> list[dict]:
        """The statistics passes of a stage over a group: one (every target at once) by default; with
        ``true_sequential``, one per set of targets sharing an input (``pipeline.passes``), for stages that
        compress one layer at a time."""
        names = segment.plans[(stage.index, group[0])]
        linears = stage.kind.matches_outputs      # module targets (a block stage replaces whole blocks)
        if len(group) > 1 or len(names) < 2 or not linears or not self.settings.passes_within_layer:
            return [segment.plans]
        i = group[0]
        return [{(stage.index, i): subset}
                for subset in input_groups(segment.layers[i], names, inputs, self.settings.compute)]

    def _compress_group(self, segment: Segment, stage: Stage, group: list[int], plan: dict, collected: dict
                        ) -> list[ModuleRecord]:
        """Compress, per module name, the members found in the group's layers (in layer order)."""
        names: list[str] = []
        for i in group:
            names += [n for n in plan[(stage.index, i)] if n not in names]
        owners = {name: [i for i in group if name in plan[(stage.index, i)]] for name in names}
        members = {name: [self._member(segment, stage, i, name, collected[i][name]) for i in owners[name]]
                   for name in names}
        work = {name: self.stream.target_members(stage, members[name],
                                                 [segment.originals[(i, name)] for i in owners[name]])
                for name in names}
        jobs = [CompressJob(sum(_cost(m.module) for m in members[name]),
                            functools.partial(self._compress_members, stage, owners[name][0], work[name]))
                for name in names]
        run = self.settings.collective.run_jobs if stage.kind.distributed else run_locally
        records = []

        def finished(index: int, outcome) -> None:   # as each job ends: its modules are logged at once
            name = names[index]
            seconds = outcome.seconds / len(members[name])
            for i, member, result in zip(owners[name], members[name], outcome.results):
                records.append(self._apply(segment, stage, Replacement(i, name, member, result, seconds)))

        run(jobs, on_done=finished)
        return records

    def _member(self, segment: Segment, stage: Stage, index: int, name: str, stats: dict[str, Statistic]
                ) -> GroupMember:
        """A target as the compressor gets it: its module, its forward statistics and its pre-pass ones."""
        full = f"{segment.prefixes[index]}.{name}"
        return GroupMember(full, segment.layers[index].get_submodule(name),
                           {**stats, **self._precomputed_for(full, stage)})

    def _compress_members(self, stage: Stage, layer: int, members: list[GroupMember]) -> list[CompressResult]:
        """One ``compress_group`` call (a job: it may run on another process), checked."""
        for member in members:
            _check_finite_weight(member.name, member.module)
        with naming_out_of_memory(f"in layer {layer} while compressing {members[0].name} "
                                  f"({stage.compressor.name})", self.settings):
            try:
                results = stage.compressor.compress_group(members)
            except torch.linalg.LinAlgError as error:
                first = str(error).strip().splitlines()[0]
                raise NumericalError(f"{members[0].name}: {stage.compressor.name} failed to decompose it ({first}); "
                                     "check the module's weights and calibration statistics for NaN/Inf") from None
        if len(results) != len(members):
            raise RuntimeError(f"{stage.compressor.name}: compress_group returned {len(results)} results "
                               f"for {len(members)} modules")
        return results

    def _collect(self, segment: Segment, stage: Stage, index: int, names: list[str], inputs: LayerInputs
                 ) -> tuple[dict[str, dict[str, Statistic]], LayerInputs]:
        """One statistics pass over layer ``index``: the statistics of its targets ``names`` (reduced across
        processes) and the layer's outputs."""
        layer = segment.layers[index]
        needs = self.stream.needs(stage)
        stats = {name: {kind: make_statistic(kind, layer.get_submodule(name), self.settings.compute,
                                             segment.originals[(index, name)])
                        for kind in sorted(needs) if not is_prepass_kind(kind)} for name in names}

        def observer_for(name: str):
            def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                for statistic in stats[name].values():
                    statistic.observe(args[0].detach(), output.detach())
            return hook

        shared = share_products(statistic for kinds in stats.values() for statistic in kinds.values())
        with hooks(layer, names, observer_for):
            outputs = self.stream.collect(index, layer, names, stats, inputs)
        shared.clear()
        return self._reduce(stats), outputs

    def _reduce(self, stats: dict[str, dict[str, Statistic]]) -> dict[str, dict[str, Statistic]]:
        """Every process's partial statistics of this layer, merged (the identity in one process)."""
        flat = {f"{name}/{kind}": statistic for name, kinds in stats.items() for kind, statistic in kinds.items()}
        reduced = self.settings.collective.reduce_statistics(flat)
        return {name: {kind: reduced[f"{name}/{kind}"] for kind in kinds} for name, kinds in stats.items()}

    def _precomputed_for(self, full_name: str, stage: Stage) -> dict[str, Statistic]:
        kinds = [kind for kind in stage.needs if is_prepass_kind(kind)]
        given = self.precomputed.get(full_name, {})
        missing = [kind for kind in kinds if kind not in given]
        if missing:
            raise LrcompressError(f"{full_name}: {stage.compressor.name} needs {missing}, which come from a "
                                  "pre-pass that was not run for this module (see pipeline.run_prepasses)")
        return {kind: given[kind] for kind in kinds}

    def _apply(self, segment: Segment, stage: Stage, done: Replacement) -> ModuleRecord:
        """Check the replacement and measure its output error, swap it in (with the config settings it
        implies) and record it: the one path for Linears and blocks."""
        member, result = done.member, done.result
        original = segment.originals[(done.layer, done.name)]
        replacement = result.module.to(self.settings.compute)
        measured = stage.kind.measure(member, original, replacement, result, stage.compressor.name)
        details = stage.kind.details(result)
        error, extra = self.stream.measured(stage, member, original, replacement, measured.error)
        if extra:
            details = {**details, **extra}
        replace_submodule(segment.layers[done.layer], done.name, replacement)
        stage.kind.update_config(self.model, stage.compressor, result, self.config_updates, member.name)
        record = ModuleRecord(
            name=member.name, layer=done.layer, stage=stage.index, method=stage.compressor.method_for(member.name),
            in_features=measured.in_features, out_features=measured.out_features,
            params_before=stored_params(member.module), params_after=stored_params(replacement),
            rank=result.rank, relative_error=error, numerical_path=result.numerical_path,
            seconds=done.seconds, details=details,
            bytes_before=storage_bytes(member.module), bytes_after=storage_bytes(replacement),
        )
        self.observer.module_done(record)
        return record


def _check_finite_weight(name: str, module: nn.Module) -> None:
    """A weight holding NaN/Inf cannot be compressed (a decomposition of it fails or spreads NaN). A Linear
    (compressed or not) is checked through its dense weight, a block through all of its parameters."""
    weights = [dense_weight(module)] if is_linear_like(module) else list(module.parameters())
    bad = sum(int((~torch.isfinite(weight.detach())).sum()) for weight in weights)
    if bad:
        raise NumericalError(f"{name}: its weight holds {bad} NaN/Inf value(s) before compression; the "
                             "checkpoint (or an earlier stage) is damaged")


def _cost(module: nn.Module) -> int:
    """The size of a decomposition, for balancing jobs across processes: in × out."""
    return int(getattr(module, "in_features", 1)) * int(getattr(module, "out_features", 1))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
