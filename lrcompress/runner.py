"""``lrcompress run``: recipe -> model + calibration windows -> pipeline -> checkpoint -> evaluation.

The library function behind the CLI: it holds the orchestration, the CLI only parses and renders.
A run is five phases, in this order: prepare (stages, model, plan), calibrate (tokenized windows),
compress (pre-passes and the layer-wise pipeline, resumable through ``pipeline.resume``), write (the
staged checkpoint completed and renamed into place) and evaluate (perplexity, lm-eval tasks).
Under ``torchrun`` every process runs this function on its shard of the calibration windows (see
``pipeline.distributed``); only rank 0 writes the checkpoint, metrics and report and evaluates, the
others wait for it at a barrier.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import yaml
from torch import nn

from .checkpoint import bytes_on_disk, check_output_dir
from .checkpoint.writer import unique_tensors
from .compressor import get_compressor
from .data import calibration_windows, data_dir, load_text, tokenize, windows_fingerprint
from .data.sources import TextSource
from .eval import EvalContext, EvalSection, RunMetrics, compression_summary, unique_param_count, versions, write_report
from .eval.baseline_cache import cached_evaluation
from .eval.metrics import CalibrationProvenance, MemoryReport, Provenance
from .eval.suite import evaluate_model
from .models import DTYPES, adapter_for
from .pipeline import LayerwisePipeline, ModuleRecord, PipelineObserver, PipelineSettings, Stage, run_prepasses
from .pipeline.distributed import Collective, process_group
from .pipeline.journal import StagedJournal
from .pipeline.memory import PeakMemory, image_peak_rss_bytes
from .pipeline.resume import open_journal, run_fingerprint
from .pipeline.settings import resolve_device
from .recipe import Recipe
from .residency import ResidentModel, model_class

__all__ = ["PlannedModule", "RunResult", "build_stages", "plan_modules", "resolve_device", "run_recipe"]


@dataclass
class PlannedModule:
    name: str
    stage: int
    method: str
    out_features: int
    in_features: int
    params_before: int
    params_after: int
    rank: int | None


@dataclass
class RunResult:
    output_dir: Path | None
    metrics: RunMetrics
    plan: list[PlannedModule] = field(default_factory=list)
    model: nn.Module | None = None          # the compressed model, in memory (for library users)


@dataclass
class Calibration:
    source: TextSource
    windows: torch.Tensor


def build_stages(recipe: Recipe) -> list[Stage]:
    return [Stage(i, get_compressor(spec.method)(recipe.stage_config(i)), spec.targets, spec.ignore)
            for i, spec in enumerate(recipe.stages)]


def plan_modules(model: nn.Module, stages: list[Stage]) -> list[PlannedModule]:
    """Every target module with its method and size before/after, without touching any weight."""
    adapter = adapter_for(model)
    planned: list[PlannedModule] = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(index)
        for stage in stages:
            for name in stage.select(layer, prefix):
                module = layer.get_submodule(name)
                plan = stage.compressor.plan(module)
                out_f, in_f = stage.shape(module, model.config)
                planned.append(PlannedModule(f"{prefix}.{name}", stage.index, stage.compressor.name, out_f, in_f,
                                             sum(p.numel() for p in module.parameters()), plan.params_after,
                                             plan.rank))
    return planned


def run_recipe(recipe: Recipe, observer: PipelineObserver | None = None, data_directory: str | None = None,
               dry_run: bool = False) -> RunResult:
    """Run ``recipe``; in one process, or in each of the processes torchrun started."""
    with process_group(resolve_device(recipe.runtime.device)) as collective:
        result = _run_recipe(recipe, observer or PipelineObserver(), data_directory, dry_run, collective)
        collective.barrier()          # the other ranks wait until rank 0 has written and evaluated
    return result


def _run_recipe(recipe: Recipe, observer: PipelineObserver, data_directory: str | None, dry_run: bool,
                collective: Collective) -> RunResult:
    run = RecipeRun(recipe, observer, collective, data_directory)
    run.prepare(dry_run)
    if dry_run:
        return RunResult(None, RunMetrics(), run.plan)
    if recipe.eval.baseline and run.writer:
        run.dense_baseline()
    calibration = run.calibrate()
    records = run.compress(calibration)
    run.write(calibration, records)
    if run.writer:
        run.evaluate()
    return run.result()


class RecipeRun:
    """One run's state as its phases fill it in: the stages, the model, the metrics."""

    def __init__(self, recipe: Recipe, observer: PipelineObserver, collective: Collective,
                 data_directory: str | None) -> None:
        self.recipe, self.observer, self.collective = recipe, observer, collective
        self.data_directory = data_directory
        self.writer = collective.is_writer
        self.output_dir = Path(recipe.output.dir)
        self.saves = recipe.output.save
        self.metrics = RunMetrics()
        self.timing = self.metrics.timing
        self.plan: list[PlannedModule] = []
        self.written_bytes: int | None = None

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.timing[phase] = time.perf_counter() - started

    # -- prepare ---------------------------------------------------------------------------------------
    def prepare(self, dry_run: bool) -> None:
        """Check the output directory, build the stages, load the model (resident or lazy), plan."""
        recipe = self.recipe
        if not dry_run and self.saves:
            check_output_dir(self.output_dir, recipe.output.overwrite)
        if recipe.runtime.threads:
            torch.set_num_threads(recipe.runtime.threads)
        torch.manual_seed(recipe.seed)
        self.stages = build_stages(recipe)
        loader = model_class(recipe, self.stages)
        with self.timed("load"):
            self.observer.phase(f"loading {recipe.model.path}{loader.loading_note}")
            self.model: ResidentModel = loader.load(recipe.model)
        self.plan = plan_modules(self.model.model, self.stages)
        if dry_run:
            return
        self.eval_context = EvalContext(data_dir(self.data_directory, recipe.data_dir),
                                        self.collective.place(resolve_device(recipe.runtime.device)),
                                        recipe.runtime.batch_size, self.observer.phase)
        self.params_before = unique_param_count(self.model.model)

    def dense_baseline(self) -> None:
        """The uncompressed model's evaluation, reused from the baseline cache when model and settings match."""
        recipe, model = self.recipe, self.model
        context = self.eval_context.streaming(model.dense_nll())
        section, cache = cached_evaluation(recipe.model.path, recipe.model.dtype, recipe.eval,
                                           context.data_directory,
                                           lambda: evaluate_model(model.model, model.tokenizer, recipe.eval, context))
        self.observer.phase(f"dense baseline {'from cache' if cache.hit else 'computed and cached'}: {cache.path}")
        self.metrics.eval = EvalSection(perplexity={}, baseline_perplexity=section.perplexity, baseline_cache=cache,
                                        baseline_lm_eval=section.lm_eval)

    # -- calibrate -------------------------------------------------------------------------------------
    def calibrate(self) -> Calibration:
        cal = self.recipe.calibration
        with self.timed("calibration_data"):
            self.observer.phase(f"tokenizing calibration data {cal.dataset}/{cal.split}")
            source = load_text(cal.dataset, cal.split, self.eval_context.data_directory)
            windows = calibration_windows(tokenize(self.model.tokenizer, source.text), cal.num_samples, cal.seq_len,
                                          cal.seed)
        return Calibration(source, windows)

    # -- compress --------------------------------------------------------------------------------------
    def compress(self, calibration: Calibration) -> list[ModuleRecord]:
        """Pre-passes, then the layer-wise pipeline; finished segments go to ``<out>.partial``."""
        recipe, model = self.recipe, self.model
        self.journal = self._journal(calibration) if self.saves else None
        with self.timed("compress"):
            settings = PipelineSettings.from_runtime(recipe.runtime, self.collective, len(calibration.windows))
            shard = self.collective.shard(calibration.windows)      # this process's windows (all of them alone)
            with PeakMemory(torch.device("cpu")) as peak:
                prepass = run_prepasses(model.model, model.adapter, self.stages, shard, settings, self.observer)
                if prepass.reports:
                    self.metrics.prepass = prepass.reports
                    self.timing["prepass"] = prepass.seconds
                records = LayerwisePipeline(model.model, model.adapter, self.stages, settings, self.observer,
                                            precomputed=prepass.statistics, layers=model.layers(),
                                            journal=self.journal).run(shard)
        self.metrics.memory = MemoryReport(compress=peak.report(), process_peak_rss_bytes=image_peak_rss_bytes(),
                                           lazy=model.lazy)
        return records

    def _journal(self, calibration: Calibration) -> StagedJournal | None:
        """The staging directory of the output, resumed when an interrupted run of this recipe left one."""
        recipe = self.recipe
        fingerprint = run_fingerprint(recipe.model_dump(), recipe.model.path, windows_fingerprint(calibration.windows),
                                      versions())
        return open_journal(self.output_dir, fingerprint, recipe.output.overwrite, self.collective,
                            self.model.adapter, DTYPES[recipe.model.dtype], self.observer.phase)

    # -- write -----------------------------------------------------------------------------------------
    def write(self, calibration: Calibration, records: list[ModuleRecord]) -> None:
        """Provenance, then (rank 0, when the run saves) the checkpoint: the staged segments plus the
        tensors outside the layers, renamed into place; then the compression accounting."""
        recipe, cal = self.recipe, self.recipe.calibration
        self.recipe_yaml = yaml.safe_dump(recipe.model_dump(), sort_keys=False)
        provenance = Provenance(
            versions=versions(), seed=recipe.seed, recipe_fingerprint=recipe.fingerprint(),
            model_source=recipe.model.path,
            calibration=CalibrationProvenance(source=calibration.source.description,
                                              text_sha256=calibration.source.fingerprint,
                                              windows_sha256=windows_fingerprint(calibration.windows),
                                              num_samples=cal.num_samples, seq_len=cal.seq_len, seed=cal.seed))
        if self.collective.world_size > 1:
            provenance.processes = self.collective.world_size
        self.metrics.provenance = provenance
        model, adapter = self.model.model, self.model.adapter
        dtype = next(model.parameters()).dtype
        if self.journal is not None and self.writer:
            with self.timed("write"):
                self.observer.phase(f"writing {self.output_dir}")
                outer, aliases = unique_tensors((name, t) for name, t in model.state_dict().items()
                                                if not name.startswith(adapter.layers + "."))
                self.journal.staging.finalize(self.output_dir, outer, aliases, model.config, dtype, provenance.dump(),
                                              self.model.tokenizer, {"recipe.yaml": self.recipe_yaml})
                self.written_bytes = bytes_on_disk(self.output_dir)
        self.metrics.compression = compression_summary(records, self.params_before, unique_param_count(model),
                                                       self.written_bytes, dtype.itemsize)
        self.records = records

    # -- evaluate --------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Token-level perplexity, then lm-eval tasks when the recipe names them (``eval.lm_eval``)."""
        model = self.model
        with self.timed("eval"):
            context = self.eval_context.streaming(model.compressed_nll(self.output_dir))
            section = evaluate_model(model.model, model.tokenizer, self.recipe.eval, context)
            baseline = self.metrics.eval
            self.metrics.eval = section.model_copy(update={
                name: getattr(baseline, name) for name in ("baseline_perplexity", "baseline_cache", "baseline_lm_eval")
                if getattr(baseline, name) is not None})

    def result(self) -> RunResult:
        """metrics.json and report.md (rank 0, when the run saves), and what the caller gets back."""
        self.metrics.modules = self.records
        saved = self.saves and self.writer
        if saved:
            self.metrics.save(self.output_dir / "metrics.json")
            write_report(self.output_dir, self.metrics, self.recipe_yaml)
        return RunResult(self.output_dir if saved else None, self.metrics, self.plan, self.model.model)
