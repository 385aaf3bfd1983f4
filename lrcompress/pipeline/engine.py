"""The layer-wise engine: capture, per-layer statistics, compression, propagation.

For each decoder layer: move it to the compute device; for each stage, hook the stage's targets,
run every batch to accumulate their statistics, compress them and swap the replacements in; then run
the batches once more through the (now compressed) layer to produce the next layer's inputs
(sequential mode), or reuse the outputs of the uncompressed layer (``sequential: false``). The engine
knows compressors only through their contract; it never branches on a method name.

Compressors return replacements and never modify the module they get, so the engine keeps each
target's module as it was before the first stage of the run touched it ("original"): snapshot
statistics (``SNAPSHOTS``, e.g. ``original_weight`` for a compensation stage) are built from it, and
every record's output error is measured against the original weight.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..compressor import Compressor, Statistic, make_statistic
from ..compressor.stats import gram_of
from ..compressor.linalg import relative_output_error
from ..errors import LrcompressError, NumericalError
from ..models import ArchitectureAdapter
from ..modules import dense_weight, storage_bytes, stored_params
from .capture import LayerInputs, capture_layer_inputs, layer_output, move
from .observer import PipelineObserver
from .prepass import is_prepass_kind
from .records import ModuleRecord
from .targets import replace_submodule, select_targets


@dataclass
class Stage:
    """A compressor bound to its target patterns (one entry of the recipe's ``stages``)."""

    index: int
    compressor: Compressor
    targets: list[str]
    ignore: list[str] = field(default_factory=list)

    @property
    def needs(self) -> frozenset[str]:
        # The Gram is always collected: it gives every module's relative output error.
        return self.compressor.needs | {"gram"}


@dataclass
class PipelineSettings:
    batch_size: int = 4
    compute: torch.device = torch.device("cpu")
    offload: torch.device = torch.device("cpu")
    sequential: bool = True


class LayerwisePipeline:
    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, stages: list[Stage],
                 settings: PipelineSettings, observer: PipelineObserver | None = None,
                 precomputed: Mapping[str, Mapping[str, Statistic]] | None = None) -> None:
        """``precomputed``: full module name → {kind: Statistic} for the kinds that come from a
        pre-pass (see ``pipeline.prepass``); they are handed to the compressor with the forward ones."""
        self.model, self.adapter, self.stages = model, adapter, stages
        self.settings = settings
        self.observer = observer or PipelineObserver()
        self.precomputed = precomputed or {}

    @torch.no_grad()
    def run(self, windows: torch.Tensor) -> list[ModuleRecord]:
        s = self.settings
        self.observer.phase(f"capturing the inputs of layer 0 for {len(windows)} windows")
        inputs = capture_layer_inputs(self.model, self.adapter, windows, s.batch_size, s.compute, s.offload)
        layers = self.adapter.decoder_layers(self.model)
        records: list[ModuleRecord] = []
        self.observer.layers_started(len(layers))
        for index, layer in enumerate(layers):
            started = time.perf_counter()
            home = next(layer.parameters()).device
            layer.to(s.compute)
            layer_records, outputs = self._compress_layer(index, layer, inputs)
            if outputs is None:
                outputs = self._forward(layer, inputs)
            layer.to(home)
            records.extend(layer_records)
            inputs = outputs
            self.observer.layer_done(index, time.perf_counter() - started)
        self.observer.finished()
        return records

    def _compress_layer(self, index: int, layer: nn.Module,
                        inputs: LayerInputs) -> tuple[list[ModuleRecord], LayerInputs | None]:
        """Run every stage on this layer; return the records and, in non-sequential mode, the outputs
        of the uncompressed layer (computed during the first statistics pass, for free)."""
        prefix = self.adapter.layer_prefix(index)
        plans = [(stage, select_targets(layer, prefix, stage.targets, stage.ignore)) for stage in self.stages]
        self.observer.layer_started(index, sum(len(names) for _, names in plans))
        records: list[ModuleRecord] = []
        uncompressed_outputs: LayerInputs | None = None
        originals: dict[str, nn.Module] = {}
        for stage, names in plans:
            if not names:
                continue
            for name in names:
                originals.setdefault(name, layer.get_submodule(name))
            keep_outputs = not self.settings.sequential and not records  # first pass: layer intact
            stats, outputs = self._collect(layer, names, stage.needs, inputs, keep_outputs, originals)
            if keep_outputs:
                uncompressed_outputs = outputs
            for name in names:
                records.append(self._compress_module(index, layer, prefix, name, stage, stats[name],
                                                     originals[name]))
        return records, uncompressed_outputs

    def _collect(self, layer: nn.Module, names: list[str], needs: frozenset[str], inputs: LayerInputs,
                 keep_outputs: bool, originals: dict[str, nn.Module],
                 ) -> tuple[dict[str, dict[str, Statistic]], LayerInputs | None]:
        stats = {name: {kind: make_statistic(kind, layer.get_submodule(name), self.settings.compute,
                                             originals[name])
                        for kind in sorted(needs) if not is_prepass_kind(kind)} for name in names}

        def observer_for(name: str):
            def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                for statistic in stats[name].values():
                    statistic.observe(args[0].detach(), output.detach())
            return hook

        handles = [layer.get_submodule(name).register_forward_hook(observer_for(name)) for name in names]
        try:
            outputs = self._forward(layer, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return stats, outputs if keep_outputs else None

    def _forward(self, layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
        s = self.settings
        hidden = []
        for batch, kwargs in zip(inputs.hidden, inputs.kwargs):
            out = layer_output(layer(batch.to(s.compute), **move(kwargs, s.compute)))
            hidden.append(out.to(s.offload))
        return LayerInputs(hidden, inputs.kwargs)

    def _precomputed_for(self, full_name: str, stage: Stage) -> dict[str, Statistic]:
        kinds = [kind for kind in stage.needs if is_prepass_kind(kind)]
        given = self.precomputed.get(full_name, {})
        missing = [kind for kind in kinds if kind not in given]
        if missing:
            raise LrcompressError(f"{full_name}: {stage.compressor.name} needs {missing}, which come from a "
                                  "pre-pass that was not run for this module (see pipeline.run_prepasses)")
        return {kind: given[kind] for kind in kinds}

    def _compress_module(self, index: int, layer: nn.Module, prefix: str, name: str, stage: Stage,
                         stats: dict[str, Statistic], original: nn.Module) -> ModuleRecord:
        full_name = f"{prefix}.{name}"
        module = layer.get_submodule(name)
        stats = {**stats, **self._precomputed_for(full_name, stage)}
        started = time.perf_counter()
        result = stage.compressor.compress(full_name, module, stats)
        seconds = time.perf_counter() - started
        replacement = result.module.to(self.settings.compute)
        approx = dense_weight(replacement).detach()
        if not torch.isfinite(approx).all():
            raise NumericalError(f"{full_name}: {stage.compressor.name} produced NaN/Inf factors "
                                 f"(path: {result.numerical_path})")
        gram = gram_of(stats)
        weight = dense_weight(original).detach().to(approx.device)
        error = relative_output_error(weight, approx, gram.gram(full_name).to(weight.device))
        replace_submodule(layer, name, replacement)
        record = ModuleRecord(
            name=full_name, layer=index, stage=stage.index, method=stage.compressor.name,
            in_features=weight.shape[1], out_features=weight.shape[0],
            params_before=stored_params(module), params_after=stored_params(replacement),
            rank=result.rank, relative_error=error, numerical_path=result.numerical_path,
            seconds=seconds, details=result.details,
            bytes_before=storage_bytes(module), bytes_after=storage_bytes(replacement),
        )
        self.observer.module_done(record)
        return record
