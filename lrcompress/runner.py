"""``lrcompress run``: recipe -> model + calibration windows -> pipeline -> checkpoint -> evaluation.

The library function behind the CLI: it holds the orchestration, the CLI only parses and renders.
Under ``torchrun`` every process runs this function on its shard of the calibration windows (see
``pipeline.distributed``); only rank 0 writes the checkpoint, metrics and report and evaluates, the
others wait for it at a barrier.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .checkpoint import bytes_on_disk
from .checkpoint.layout import disk_errors
from .checkpoint.lock import claim_output_dir
from .checkpoint.writer import unique_tensors
from .compressor import get_compressor
from .data import TextSource, calibration_windows, data_dir, load_text, tokenize, windows_fingerprint
from .errors import LrcompressError
from .eval import compression_summary, unique_param_count, versions, write_metrics, write_report
from .eval.baseline_cache import cached_evaluation, eval_settings
from .eval.perplexity import WindowsNll, windows_nll
from .eval.streamed import StreamedNll
from .eval.suite import evaluate_model
from .models import DTYPES, adapter_for, load_model
from .models.loading import LoadedModel
from .models.lazy import LayerStore, LazyLayers, ResidentLayers, load_lazy
from .pipeline import LayerwisePipeline, PipelineObserver, PipelineSettings, Stage, run_prepasses
from .pipeline.allocation import allocate, needs_allocation, strategy_of
from .pipeline.distributed import Collective, process_group
from .pipeline.journal import StagedJournal
from .pipeline.memory import PeakMemory, image_peak_rss_bytes
from .pipeline.plan import PlannedModule, plan_modules  # noqa: F401  (re-exported: runner.PlannedModule)
from .pipeline.prepass import is_prepass_kind
from .pipeline.resume import open_staging, read_staging, restore_written, run_fingerprint
from .preflight import check_growth, preflight
from .recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path | None
    metrics: dict[str, Any]
    plan: list[PlannedModule] = field(default_factory=list)
    model: nn.Module | None = None          # the compressed model, in memory (for library users)
    data_sources: list[str] = field(default_factory=list)   # where each dataset and task is read from


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LrcompressError("runtime.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_stages(recipe: Recipe) -> list[Stage]:
    return [Stage(i, get_compressor(spec.method)(recipe.stage_config(i)), spec.targets, spec.ignore,
                  spec.allocation) for i, spec in enumerate(recipe.stages)]


def check_lazy(recipe: Recipe, stages: list[Stage]) -> None:
    """What lazy mode cannot do, refused before any work: it writes layers as they finish (so it needs
    an output directory) and never holds the whole model (no lm-eval tasks, no whole-model pre-pass)."""
    if not recipe.output.save:
        raise LrcompressError("runtime.lazy writes each block of layers as it finishes: it needs output.save: true")
    if recipe.eval.lm_eval is not None:
        raise LrcompressError("runtime.lazy: lm-eval tasks need the whole model in memory; remove eval.lm_eval "
                              "(perplexity is streamed layer by layer) or evaluate the checkpoint afterwards "
                              "with `lrcompress eval` on a machine that holds it")
    for stage in stages:
        kinds = sorted(kind for kind in stage.needs if is_prepass_kind(kind))
        if strategy_of(stage) == "global":
            kinds.append("output_gradient (allocation: global)")
        if kinds:
            raise LrcompressError(f"runtime.lazy: stage {stage.index} ({stage.compressor.name}) needs {kinds}, a pass "
                                  "over the whole model; use runtime.lazy: false")


def run_recipe(recipe: Recipe, observer: PipelineObserver | None = None, data_directory: str | None = None,
               dry_run: bool = False, given: GivenInputs | None = None) -> RunResult:
    """Run ``recipe``; in one process, or in each of the processes torchrun started. ``given``: a model
    and/or calibration data the caller already holds (``lrcompress.run``), used instead of the recipe's.

    Everything that can be checked without the weights is checked first (``preflight``: data, targets,
    sizes, sequence lengths), then the writing process claims the output directory (its lock, held until
    the run ends), and only then is the model loaded."""
    observer = observer or PipelineObserver()
    given = given or GivenInputs()
    with process_group(resolve_device(recipe.runtime.device)) as collective:
        stages = build_stages(recipe)
        if recipe.runtime.lazy:
            check_lazy(recipe, stages)
        directory = data_dir(data_directory, recipe.data_dir)
        quiet = (lambda message: None)
        sources: list[str] = []
        observer.phase("checking the datasets, tasks and targets")
        plan = preflight(recipe, stages, directory, log.warning if collective.is_writer else quiet,
                         model=given.loaded.model if given.loaded else None, sources=sources,
                         calibration_given=given.calibration is not None)
        check_growth(recipe, plan)
        if dry_run and not needs_allocation(stages):
            return RunResult(None, {}, plan, data_sources=sources)
        # A dry run with a budget allocation loads the model and runs the spectra pre-pass (nothing written).
        claims = collective.is_writer and recipe.output.save and not dry_run
        with claim_output_dir(Path(recipe.output.dir), recipe.output.overwrite, log.warning) if claims \
                else nullcontext():
            result = _run_recipe(recipe, observer, directory, collective, stages, plan, given, dry_run)
        result.data_sources = sources
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
    given = given or GivenInputs()
    writer = collective.is_writer
    timing: dict[str, float] = {}
    output_dir = Path(recipe.output.dir)
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    torch.manual_seed(recipe.seed)
    lazy = recipe.runtime.lazy

    started = time.perf_counter()
    observer.phase(f"loading {recipe.model.path}" + (" (lazy: tensors outside the decoder layers only)" if lazy else ""))
    loaded = given.loaded or (load_lazy if lazy else load_model)(recipe.model.path, recipe.model.dtype,
                                                                 recipe.model.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    timing["load"] = time.perf_counter() - started
    if recipe.calibration.chat_template and not getattr(tokenizer, "chat_template", None):
        raise LrcompressError("calibration.chat_template is true but the tokenizer of "
                              f"{recipe.model.path} has no chat template")

    compute = collective.place(resolve_device(recipe.runtime.device))
    adapter = adapter_for(model)
    store: LayerStore = LazyLayers(model, adapter, loaded.local_dir) if lazy else ResidentLayers()
    params_before = unique_param_count(model)
    metrics: dict[str, Any] = {"eval": {"perplexity": {}}}
    if recipe.eval.baseline and writer and not dry_run:
        nll = StreamedNll(store, adapter) if lazy else windows_nll
        metrics["eval"].update(_dense_baseline(model, tokenizer, recipe, directory, compute, observer, nll))

    started = time.perf_counter()
    cal = recipe.calibration
    observer.phase(f"tokenizing calibration data {cal.dataset}/{cal.split}")
    if isinstance(given.calibration, torch.Tensor):
        windows = given.calibration
        source = TextSource("", f"{len(windows)} token windows given in memory", windows_fingerprint(windows))
    else:
        source = given.calibration or load_text(cal.dataset, cal.split, directory, config=cal.config,
                                                text_column=cal.text_column,
                                                chat_tokenizer=tokenizer if cal.chat_template else None)
        windows = calibration_windows(tokenize(tokenizer, source.text), cal.num_samples, cal.seq_len, cal.seed)
    timing["calibration_data"] = time.perf_counter() - started

    settings = PipelineSettings(recipe.runtime.batch_size, compute,
                                collective.place(torch.device(recipe.runtime.offload_device)),
                                recipe.runtime.sequential, collective, len(windows),
                                target=recipe.runtime.target, target_damping=recipe.runtime.target_damping,
                                target_blend=recipe.runtime.target_blend,
                                true_sequential=recipe.runtime.true_sequential)
    # A budget over a stage's modules: the spectra pre-pass chooses every module's rank (and binds it
    # to the stage) before any decomposition; --dry-run stops right after it, with the ranks planned.
    started = time.perf_counter()
    allocation = allocate(model, adapter, stages, collective.shard(windows), settings, observer, store)
    if allocation is not None:
        metrics["allocation"] = allocation.to_dict()
        timing["allocation"] = time.perf_counter() - started
    if dry_run:
        return RunResult(None, metrics, plan_modules(model, stages))

    journal = staging = None
    if recipe.output.save:  # finished blocks go to <out>.partial as they finish; a matching one is resumed
        fingerprint = run_fingerprint(recipe.model_dump(), loaded.local_dir, recipe.model.path,
                                      windows_fingerprint(windows), versions())
        # Rank 0 alone creates, resumes or discards the staging directory and writes to it; the other
        # processes read what was finished before this run (to skip and replay it as rank 0 does) and keep
        # the blocks compressed now in memory (identical to rank 0's: the same bytes were broadcast).
        if writer:
            staging = open_staging(output_dir, fingerprint, recipe.output.overwrite, observer.phase)
        collective.barrier()
        if not writer:
            staging = read_staging(output_dir)
        if staging is not None:
            journal = StagedJournal(staging, adapter, DTYPES[recipe.model.dtype], writes=writer)
    written = staging is not None and staging.is_written()   # killed during evaluation: only that is left

    started = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as peak:
        if written:
            records = restore_written(model, journal, store)
        else:
            records = _compress(model, adapter, stages, windows, settings, observer, store, journal, metrics,
                                timing)
    timing["compress"] = time.perf_counter() - started
    metrics["memory"] = {"compress": peak.report(), "process_peak_rss_bytes": image_peak_rss_bytes(), "lazy": lazy}

    recipe_yaml = yaml.safe_dump(recipe.model_dump(), sort_keys=False)
    provenance = {
        "versions": versions(), "seed": recipe.seed, "recipe_fingerprint": recipe.fingerprint(),
        "model_source": recipe.model.path,
        "calibration": {"source": source.description, "text_sha256": source.fingerprint,
                        "windows_sha256": windows_fingerprint(windows), "num_samples": cal.num_samples,
                        "seq_len": cal.seq_len, "seed": cal.seed},
    }
    metrics["provenance"] = provenance
    if collective.world_size > 1:
        provenance["processes"] = collective.world_size
    written_bytes = None
    dtype = next(model.parameters()).dtype
    if staging is not None and writer:
        started = time.perf_counter()
        if not written:
            observer.phase(f"writing {staging.path}")
            outer, aliases = unique_tensors((name, t) for name, t in model.state_dict().items()
                                            if not name.startswith(adapter.layers + "."))
            staging.complete(outer, aliases, model.config, dtype, provenance, tokenizer, {"recipe.yaml": recipe_yaml},
                             source=loaded.local_dir or recipe.model.path)
        written_bytes = bytes_on_disk(staging.path)
        timing["write"] = time.perf_counter() - started

    metrics["compression"] = compression_summary(records, params_before, unique_param_count(model),
                                                 written_bytes, dtype.itemsize)
    if writer:
        started = time.perf_counter()
        nll = _streamed_from_checkpoint(model, adapter, staging.path) if lazy else windows_nll
        metrics["eval"].update(_evaluate(model, tokenizer, recipe, directory, compute, observer, nll))
        timing["eval"] = time.perf_counter() - started
    metrics["timing"] = timing
    metrics["modules"] = [r.to_dict() for r in records]
    if staging is not None and writer:   # the run is complete when its metrics are: only then is <out> there
        with disk_errors(f"writing metrics.json and report.md into {staging.path}", staging.path):
            write_metrics(staging.path / "metrics.json", metrics)
            write_report(staging.path, metrics, recipe_yaml)
        staging.publish(output_dir)
    return RunResult(output_dir if recipe.output.save and writer else None, metrics, plan, model)


def _compress(model: nn.Module, adapter, stages: list[Stage], windows: torch.Tensor, settings: PipelineSettings,
              observer: PipelineObserver, store: LayerStore, journal: StagedJournal | None, metrics: dict[str, Any],
              timing: dict[str, float]) -> list:
    """The pre-passes (e.g. Fisher) and the layer-wise pipeline over this process's windows."""
    shard = settings.collective.shard(windows)              # this process's windows (all of them alone)
    prepass = run_prepasses(model, adapter, stages, shard, settings, observer)  # e.g. Fisher, once
    if prepass.reports:
        metrics["prepass"] = prepass.reports
        timing["prepass"] = prepass.seconds
    pipeline = LayerwisePipeline(model, adapter, stages, settings, observer, prepass.statistics, store, journal)
    records = pipeline.run(shard)
    if pipeline.reference is not None:     # output matching: its extra time and memory
        metrics["output_matching"] = pipeline.reference.report()
    return records


def _streamed_from_checkpoint(model: nn.Module, adapter, checkpoint: Path) -> WindowsNll:
    """Lazy mode evaluates the written checkpoint one layer at a time (its layers are not in memory)."""
    from .checkpoint import read_metadata

    _, meta = read_metadata(checkpoint)
    return StreamedNll(LazyLayers(model, adapter, checkpoint, meta.get("tied", {})), adapter)


def _evaluate(model: nn.Module, tokenizer, recipe: Recipe, directory, device: torch.device,
              observer: PipelineObserver, nll: WindowsNll = windows_nll) -> dict[str, Any]:
    """Token-level perplexity, then lm-eval tasks when the recipe names them (``eval.lm_eval``)."""
    return evaluate_model(model, tokenizer, recipe.eval.perplexity, recipe.eval.lm_eval, directory, device,
                          recipe.runtime.batch_size, observer.phase, nll)


def _dense_baseline(model: nn.Module, tokenizer, recipe: Recipe, directory, device: torch.device,
                    observer: PipelineObserver, nll: WindowsNll) -> dict[str, Any]:
    """The uncompressed model's evaluation, reused from the baseline cache when model and settings match."""
    settings = eval_settings(recipe.eval.perplexity, recipe.eval.lm_eval, directory)
    section, cache = cached_evaluation(recipe.model.path, recipe.model.dtype, settings,
                                       lambda: _evaluate(model, tokenizer, recipe, directory, device, observer, nll))
    observer.phase(f"dense baseline {'from cache' if cache['hit'] else 'computed and cached'}: {cache['path']}")
    baseline = {"baseline_perplexity": section["perplexity"], "baseline_cache": cache}
    if "lm_eval" in section:
        baseline["baseline_lm_eval"] = section["lm_eval"]
    return baseline
