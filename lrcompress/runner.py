"""``lrcompress run``: recipe -> model + calibration windows -> pipeline -> checkpoint -> evaluation.

The library function behind the CLI: it holds the orchestration, the CLI only parses and renders.
Everything that can be checked without the weights is checked first (``preflight``: data, targets,
sizes, sequence lengths), then the writing process claims the output directory (its lock, held until
the run ends). Then a run is five phases, in this order: prepare (the model, resident or lazy),
calibrate (tokenized windows; then a budget allocation's ranks, when a stage asks for one: a dry run
stops there), compress (pre-passes and the layer-wise pipeline, resumable through ``pipeline.resume``),
write (the staged checkpoint completed) and evaluate (perplexity, lm-eval tasks); metrics.json and the
report go into the staged directory, which is then renamed into place.
Under ``torchrun`` every process runs this function on its shard of the calibration windows (see
``pipeline.distributed``); only rank 0 writes the checkpoint, metrics and report and evaluates, the
others wait for it at a barrier.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import yaml
from torch import nn

from .checkpoint import bytes_on_disk
from .checkpoint.layout import disk_errors
from .checkpoint.lock import claim_output_dir
from .checkpoint.writer import unique_tensors
from .compressor import get_compressor
from .core.devices import resolve_device
from .core.version import __version__
from .data import DatasetRef, TextSource, calibration_windows, data_dir, tokenize, windows_fingerprint
from .data.mixture import CalibrationSet, calibration_set
from .errors import LrcompressError
from .eval import EvalContext
from .results import EvalSection, RunMetrics, compression_summary, unique_param_count, versions, write_report
from .eval.baseline_cache import cached_evaluation
from .results.metrics import CalibrationProvenance, MemoryReport, Provenance
from .eval.suite import evaluate_model
from .models import DTYPES
from .models.identity import model_identity
from .models.loading import LoadedModel
from .modules import compressed_modules
from .pipeline import LayerwisePipeline, ModuleRecord, PipelineObserver, PipelineSettings, Stage, run_prepasses
from .pipeline.allocation import allocate, needs_allocation
from .pipeline.costs import RunCosts, check_fit, fit_refusals
from .pipeline.distill import DistillConfig
from .pipeline.distill_stage import DistillStage, describe_distill, distill_windows
from .pipeline.bytebudget import BudgetCompressor, Choice
from .pipeline.distributed import Collective, process_group
from .pipeline.embedding import quantize_model_embedding
from .pipeline.journal import StagedJournal
from .pipeline.memory import PeakMemory, image_peak_rss_bytes
from .pipeline.plan import PlannedModule, plan_modules
from .pipeline.refine import describe_refine, refine_summary
from .pipeline.resume import open_shared_staging, restore_written, run_fingerprint
from .pipeline.walk import LayerWalk
from .preflight import check_growth, plan_costs, plan_embedding, preflight
from .recipe import Recipe
from .residency import ResidentModel, model_class

__all__ = ["GivenInputs", "RunResult", "build_stages", "run_recipe"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path | None
    metrics: RunMetrics
    plan: list[PlannedModule] = field(default_factory=list)
    model: nn.Module | None = None          # the compressed model, in memory (for library users)
    data_sources: list[str] = field(default_factory=list)   # where each dataset and task is read from
    costs: RunCosts | None = None           # the cost model's prediction (pipeline.costs), made before loading


def build_stages(recipe: Recipe) -> list[Stage]:
    """The recipe's stages; a ``budget`` section is one stage whose compressor applies each module's choice."""
    if recipe.budget is not None:
        choices = [Choice(label, steps) for label, steps in recipe.budget_configs()]
        return [Stage(0, BudgetCompressor(choices, recipe.budget), recipe.budget.targets, recipe.budget.ignore)]
    return [Stage(i, get_compressor(spec.method)(recipe.stage_config(i)), spec.targets, spec.ignore,
                  spec.allocation) for i, spec in enumerate(recipe.stages)]


def _quiet(message: str) -> None:
    """Warnings of the processes that do not write (rank 0 says them once)."""


def run_recipe(recipe: Recipe, observer: PipelineObserver | None = None, data_directory: str | None = None,
               dry_run: bool = False, given: GivenInputs | None = None) -> RunResult:
    """Run ``recipe``; in one process, or in each of the processes torchrun started. ``given``: a model
    and/or calibration data the caller already holds (``lrcompress.run``), used instead of the recipe's.

    Everything that can be checked without the weights is checked first, then the writing process
    claims the output directory (its lock, held until the run ends), and only then is the model loaded."""
    observer = observer or PipelineObserver()
    given = given or GivenInputs()
    with process_group(resolve_device(recipe.runtime.device)) as collective:
        stages = build_stages(recipe)
        model_class(recipe, stages)                 # lazy mode's refusals, before any work
        directory = data_dir(data_directory, recipe.data_dir)
        sources: list[str] = []
        observer.phase("checking the datasets, tasks and targets")
        plan = preflight(recipe, stages, directory, log.warning if collective.is_writer else _quiet,
                         model=given.loaded.model if given.loaded else None, sources=sources,
                         calibration_given=given.calibration is not None)
        check_growth(recipe, plan)
        outer_plan = plan_embedding(recipe, given.loaded.model if given.loaded else None)
        costs = plan_costs(recipe, plan, given.loaded.model if given.loaded else None)
        if dry_run:                                  # shown, not raised: the plan is what was asked for
            fit_refusals(costs, recipe)
        else:
            check_fit(costs, recipe)
        sources += describe_refine(recipe.runtime, recipe.calibration.num_samples, recipe.seed)
        sources += describe_distill(recipe.runtime, recipe.calibration.num_samples, recipe.seed)
        if dry_run and not needs_allocation(stages):
            return RunResult(None, RunMetrics(), outer_plan + plan, data_sources=sources, costs=costs)
        # A dry run with a budget allocation loads the model and runs the spectra pre-pass (nothing written).
        claims = collective.is_writer and recipe.output.save and not dry_run
        with claim_output_dir(Path(recipe.output.dir), recipe.output.overwrite, log.warning) if claims \
                else nullcontext():
            result = _run_recipe(recipe, observer, directory, collective, stages, plan, given, dry_run)
        result.plan = outer_plan + result.plan
        result.data_sources, result.costs = sources, costs
        collective.barrier()          # the other ranks wait until rank 0 has written and evaluated
    return result


@dataclass
class GivenInputs:
    """What a library caller hands over: a loaded model (compressed in place) and calibration data, as
    text (``TextSource``) or as token windows (a LongTensor, num_samples × seq_len)."""

    loaded: LoadedModel | None = None
    calibration: TextSource | torch.Tensor | None = None


def _run_recipe(recipe: Recipe, observer: PipelineObserver, directory: Path | None, collective: Collective,
                stages: list[Stage], plan: list[PlannedModule], given: GivenInputs | None = None,
                dry_run: bool = False) -> RunResult:
    run = RecipeRun(recipe, observer, collective, directory, stages, plan, given or GivenInputs())
    run.prepare()
    if recipe.eval.baseline and run.writer and not dry_run:
        run.dense_baseline()
    run.quantize_embedding()
    calibration = run.calibrate()
    run.allocate(calibration)
    if dry_run:                # a budget's ranks are planned: the plan shows them, nothing is compressed
        return RunResult(None, run.metrics, plan_modules(run.model.model, run.stages))
    records = run.embedding_records + run.compress(calibration)
    run.write(calibration, records)
    if run.writer:
        run.evaluate()
    return run.result()


class RecipeRun:
    """One run's state, every field declared here; the phases fill them in, in order."""

    def __init__(self, recipe: Recipe, observer: PipelineObserver, collective: Collective, directory: Path | None,
                 stages: list[Stage], plan: list[PlannedModule], given: GivenInputs | None = None) -> None:
        self.recipe, self.observer, self.collective = recipe, observer, collective
        self.stages, self.plan, self.directory = stages, plan, directory   # allocate() may bind ranks: new stages
        self.given = given or GivenInputs()
        self.writer = collective.is_writer
        self.output_dir = Path(recipe.output.dir)
        self.saves = recipe.output.save
        self.metrics = RunMetrics()
        self.timing = self.metrics.timing
        # prepare
        self.model: ResidentModel | None = None
        self.eval_context: EvalContext | None = None
        self.params_before = 0
        self.embedding_records: list[ModuleRecord] = []    # the recipe's embedding key, before the walk
        # compress
        self.journal: StagedJournal | None = None
        self.written = False                  # the staged checkpoint was complete already (a resumed run)
        # write
        self.recipe_yaml = ""
        self.written_bytes: int | None = None
        self.records: list[ModuleRecord] = []

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.timing[phase] = time.perf_counter() - started

    # -- prepare ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load the model, resident or lazy as the recipe says."""
        recipe = self.recipe
        if recipe.runtime.threads:
            torch.set_num_threads(recipe.runtime.threads)
        torch.manual_seed(recipe.seed)
        loader = model_class(recipe, self.stages)
        with self.timed("load"):
            self.observer.phase(f"loading {recipe.model.path}{loader.loading_note}")
            given = self.given.loaded              # a library caller's model is compressed in place
            self.model = loader(given) if given is not None else loader.load(recipe.model)
        tokenizer = self.model.tokenizer
        if recipe.calibration.uses_chat_template and not getattr(tokenizer, "chat_template", None):
            raise LrcompressError("calibration.chat_template is true but the tokenizer of "
                                  f"{recipe.model.path} has no chat template")
        self.eval_context = EvalContext(self.directory, self.collective.place(resolve_device(recipe.runtime.device)),
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

    def quantize_embedding(self) -> None:
        """The recipe's ``embedding`` key, after the dense baseline and before anything sees the model."""
        if self.recipe.embedding is not None:
            self.observer.phase("quantizing the token embedding (data-free)")
            self.embedding_records = quantize_model_embedding(self.model.model, self.model.adapter,
                                                              self.recipe.embedding)

    # -- calibrate -------------------------------------------------------------------------------------
    def calibrate(self) -> CalibrationSet:
        cal = self.recipe.calibration
        with self.timed("calibration_data"):
            self.observer.phase("tokenizing calibration data " + ", ".join(DatasetRef.of(p).label
                                                                         for p in cal.parts()))
            given, tokenizer = self.given.calibration, self.model.tokenizer
            if isinstance(given, torch.Tensor):    # token windows handed over by a library caller
                return CalibrationSet(TextSource("", f"{len(given)} token windows given in memory",
                                              windows_fingerprint(given)), given)
            if given is not None:                  # text handed over by a library caller: the whole set
                return CalibrationSet(given, calibration_windows(tokenize(tokenizer, given.text), cal.num_samples,
                                                              cal.seq_len, cal.seed, given.description))
            drawn = calibration_set(cal, tokenizer, self.eval_context.data_directory)
        return drawn

    def walk(self, calibration: CalibrationSet) -> LayerWalk:
        """The uncompressed model and this process's calibration windows (all of them alone), for a walk."""
        settings = PipelineSettings.from_runtime(self.recipe.runtime, self.collective, len(calibration.windows),
                                                 self.recipe.seed)
        return LayerWalk(self.model.model, self.model.adapter, self.collective.shard(calibration.windows), settings,
                         self.observer, self.model.layers())

    def allocate(self, calibration: CalibrationSet) -> None:
        """A budget over a stage's modules: the spectra pre-pass chooses every module's rank (the run then
        compresses with stages bound to them) before any decomposition. Nothing happens when every stage is
        uniform."""
        started = time.perf_counter()
        self.stages, allocation = allocate(self.walk(calibration), self.stages, self._budget_cache_key(calibration))
        if allocation is not None:
            self.metrics.allocation = allocation
            self.timing["allocation"] = time.perf_counter() - started

    def _budget_cache_key(self, calibration: CalibrationSet) -> dict | None:
        """What a byte budget's prices depend on (None: not kept, for a model a library caller handed over,
        whose files may not be what it holds)."""
        recipe = self.recipe
        if recipe.budget is None or self.given.loaded is not None:
            return None
        budget = recipe.budget.model_dump(exclude={"bytes", "mib", "bits_per_weight", "solver"})
        embedding = {"embedding": recipe.embedding.model_dump()} if recipe.embedding is not None else {}
        return {**embedding, "model": model_identity(recipe.model.path), "dtype": recipe.model.dtype,
                "windows": windows_fingerprint(calibration.windows), "budget": budget,
                "choices": [[label, [[m, c.model_dump()] for m, c in steps]] for label, steps in recipe.budget_configs()],
                "device": self.eval_context.device.type, "lrcompress": __version__}

    # -- compress --------------------------------------------------------------------------------------
    def compress(self, calibration: CalibrationSet) -> list[ModuleRecord]:
        """Pre-passes, then the layer-wise pipeline; finished segments go to ``<out>.partial``. A staged run
        killed during its evaluation is written already: its layers are restored, nothing is compressed."""
        self.journal = self._journal(calibration) if self.saves else None
        self.written = self.journal is not None and self.journal.staging.is_written()
        with self.timed("compress"), PeakMemory(torch.device("cpu")) as peak:
            if self.written:
                records = restore_written(self.model.model, self.journal, self.model.layers())
                distill = self._distill_stage(calibration)
                self.metrics.distill = distill.saved() if distill is not None else None
            else:
                records = self._compress(calibration)
        self.metrics.refine = refine_summary(self.recipe.runtime.refine, records)   # from the records: resumed too
        if self.metrics.distill is not None:
            self.metrics.distill.pop("committed", None)
            self.timing["distill"] = self.metrics.distill["seconds"] + self.metrics.distill["teacher_seconds"]
        self.metrics.memory = MemoryReport(compress=peak.report(), process_peak_rss_bytes=image_peak_rss_bytes(),
                                           lazy=self.model.lazy)
        return records

    def _compress(self, calibration: CalibrationSet) -> list[ModuleRecord]:
        walk = self.walk(calibration)
        prepass = run_prepasses(walk, self.stages)
        if prepass.reports:
            self.metrics.prepass = prepass.reports
            self.timing["prepass"] = prepass.seconds
        distill = self._distill_stage(calibration)
        if distill is not None:              # the teacher: the model as the walk receives it
            windows = distill_windows(self.recipe.calibration, self.recipe.runtime.distill.windows_scale,
                                      self.model.tokenizer, self.eval_context.data_directory, walk.windows)
            distill.capture(self.model.model, windows, self.recipe.runtime.batch_size)
        pipeline = LayerwisePipeline(walk, self.stages, precomputed=prepass.statistics, journal=self.journal)
        records = pipeline.run()
        self.metrics.output_matching = pipeline.stream.report()    # output matching's extra time and memory
        if distill is not None:
            self.observer.phase("distilling the compressed factors toward the original model's next-token "
                                "distributions (runtime.distill)")
            self.metrics.distill = distill.finish(self.model.model, windows)
        return records

    def _distill_stage(self, calibration: CalibrationSet) -> DistillStage | None:
        """``runtime.distill``'s stage (None when it is off), seeded from the recipe's seed."""
        spec = self.recipe.runtime.distill
        if spec is None:
            return None
        config = DistillConfig(**spec.model_dump(), seed=self.recipe.seed)
        return DistillStage(config, self.model.adapter, self.journal,
                            self.collective.place(resolve_device(self.recipe.runtime.device)),
                            self.collective.world_size)

    def _journal(self, calibration: CalibrationSet) -> StagedJournal | None:
        """The staging directory of the output, resumed when an interrupted run of this recipe left one."""
        recipe = self.recipe
        fingerprint = run_fingerprint(recipe.model_dump(), recipe.model.path, windows_fingerprint(calibration.windows),
                                      versions())
        staging = open_shared_staging(self.output_dir, fingerprint, recipe.output.overwrite, self.collective,
                                      self.observer.phase)
        return None if staging is None else StagedJournal(staging, self.model.adapter, DTYPES[recipe.model.dtype],
                                                          writes=self.collective.is_writer)

    # -- write -----------------------------------------------------------------------------------------
    def write(self, calibration: CalibrationSet, records: list[ModuleRecord]) -> None:
        """Provenance, then (rank 0, when the run saves) the checkpoint: the staged segments plus the
        tensors outside the layers, config.json and the tokenizer; then the compression accounting."""
        recipe, cal = self.recipe, self.recipe.calibration
        self.recipe_yaml = yaml.safe_dump(recipe.model_dump(), sort_keys=False)
        provenance = Provenance(
            versions=versions(), seed=recipe.seed, recipe_fingerprint=recipe.fingerprint(),
            model_source=recipe.model.path,
            calibration=CalibrationProvenance(source=calibration.source.description,
                                              text_sha256=calibration.source.fingerprint,
                                              windows_sha256=windows_fingerprint(calibration.windows),
                                              num_samples=cal.num_samples, seq_len=cal.seq_len, seed=cal.seed,
                                              sources=[p.record() for p in calibration.parts]
                                              if calibration.parts is not None else None))
        if self.collective.world_size > 1:
            provenance.processes = self.collective.world_size
        self.metrics.provenance = provenance
        model, adapter = self.model.model, self.model.adapter
        dtype = next(model.parameters()).dtype
        if self.journal is not None and self.writer:
            staging = self.journal.staging
            with self.timed("write"):
                if not self.written:
                    self.observer.phase(f"writing {staging.path}")
                    outer, aliases = unique_tensors((name, t) for name, t in model.state_dict().items()
                                                    if not name.startswith(adapter.layers + "."))
                    staging.complete(outer, aliases, model.config, dtype, provenance.dump(), self.model.tokenizer,
                                     {"recipe.yaml": self.recipe_yaml},
                                     source=self.model.loaded.local_dir or recipe.model.path,
                                     outer_specs={name: module.spec() for name, module in compressed_modules(model)
                                                  if not name.startswith(adapter.layers + ".")})
                self.written_bytes = bytes_on_disk(staging.path)
        self.metrics.compression = compression_summary(records, self.params_before, unique_param_count(model),
                                                       self.written_bytes, dtype.itemsize)
        self.records = records

    # -- evaluate --------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Token-level perplexity, then lm-eval tasks when the recipe names them (``eval.lm_eval``)."""
        model = self.model
        with self.timed("eval"):
            written = self.journal.staging.path if self.journal is not None else self.output_dir
            context = self.eval_context.streaming(model.compressed_nll(written))
            section = evaluate_model(model.model, model.tokenizer, self.recipe.eval, context)
            baseline = self.metrics.eval
            self.metrics.eval = section.model_copy(update={
                name: getattr(baseline, name) for name in ("baseline_perplexity", "baseline_cache", "baseline_lm_eval")
                if getattr(baseline, name) is not None})

    def result(self) -> RunResult:
        """metrics.json and report.md into the staged checkpoint, which is then renamed into place (rank 0,
        when the run saves: a run is complete when its metrics are), and what the caller gets back."""
        self.metrics.modules = self.records
        saved = self.saves and self.writer
        if saved and self.journal is not None:
            staging = self.journal.staging
            with disk_errors(f"writing metrics.json and report.md into {staging.path}", staging.path):
                self.metrics.save(staging.path / "metrics.json")
                write_report(staging.path, self.metrics, self.recipe_yaml)
            staging.publish(self.output_dir)
        return RunResult(self.output_dir if saved else None, self.metrics, self.plan, self.model.model)
