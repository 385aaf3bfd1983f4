"""Rendering for the CLI: rich progress on a terminal, plain log lines otherwise; summary tables."""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..eval.protocol import ZERO_SHOT_METRIC, ZERO_SHOT_TASKS, zero_shot_average
from ..results.inspect import Inspection
from ..results.metrics import RunMetrics, describe_change, format_bytes
from ..pipeline import LoggingObserver, ModuleRecord, PipelineObserver
from ..pipeline.allocation import AllocationResult
from ..pipeline.bytebudget import ByteBudgetResult
from ..pipeline.observer import PlannedWork, WorkProgress
from ..pipeline.memory import describe_peak_memory

console = Console(stderr=True, log_path=False)   # no "render.py:67" on every line


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line, for batch systems: time, level, logger, message and structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                   "logger": record.name, "message": record.getMessage()}
        payload.update(getattr(record, "fields", {}))
        return json.dumps(payload, default=str)


def setup_logging(verbose: bool, json_lines: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if json_lines:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLineFormatter())
        fmt = None
    elif console.is_terminal:
        handler = RichHandler(console=console, show_path=False, markup=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(message)s"
    if fmt is not None:
        handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown the pipeline's own


class RichObserver(PipelineObserver):
    """Two bars: layers (done/total, ETA from the work left, peak memory so far) and the modules of the
    current layer; a line per module as it finishes."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                                 TextColumn("{task.fields[memory]}"), console=console, transient=False)
        self.work = WorkProgress()
        self.layers_task: Any = None
        self.modules_task: Any = None

    def phase(self, description: str) -> None:
        console.log(description)

    def layers_started(self, total: int) -> None:
        self.work = WorkProgress(total)
        self.progress.start()
        self.layers_task = self.progress.add_task("layers", total=total, memory="", eta=self.work.eta_text())
        self.modules_task = self.progress.add_task("modules", total=0, memory="", eta="")

    def work_planned(self, work: list[PlannedWork]) -> None:
        self.work.plan(work)

    def layer_started(self, index: int, modules: int) -> None:
        self.progress.reset(self.modules_task, total=modules, description=f"layer {index} modules")

    def module_done(self, record: ModuleRecord) -> None:
        self.work.module_done(record.layer, record.stage, record.params_before, record.seconds)
        rank = f" rank {record.rank}" if record.rank is not None else ""
        console.log(f"  {record.name} [{record.method}{rank}] rel.err {record.relative_error:.4f} "
                    f"{record.seconds:.1f}s", highlight=False)
        self.progress.advance(self.modules_task)
        self.progress.update(self.layers_task, eta=self.work.eta_text())

    def layer_done(self, index: int, seconds: float) -> None:
        self.work.finish(index)
        self.progress.update(self.layers_task, advance=1, memory=describe_peak_memory(), eta=self.work.eta_text())

    def finished(self) -> None:
        self.progress.stop()


def make_observer(json_lines: bool = False) -> PipelineObserver:
    return RichObserver() if console.is_terminal and not json_lines else LoggingObserver()


def plan_table(plan) -> Table:
    table = Table(title="compression plan")
    for column in ("module", "stage", "method", "shape (out×in)", "bytes before", "bytes after", "params before",
                   "params after", "rank", "note"):
        table.add_column(column, justify="left" if column in ("module", "method", "shape (out×in)", "note") else "right")
    for p in plan:
        table.add_row(p.name, str(p.stage), p.method, f"{p.out_features}×{p.in_features}", format_bytes(p.bytes_before),
                      format_bytes(p.bytes_after), f"{p.params_before:,}", f"{p.params_after:,}",
                      "–" if p.rank is None else str(p.rank), "[bold red]does not shrink[/]" if p.grows else "")
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for p in plan:                        # a module of several stages: its first "before", its last "after"
        first.setdefault(p.name, p)
        last[p.name] = p
    names = list(first)
    grown = sum(p.grows for p in plan)
    table.caption = (f"{len(names)} target modules; "
                     f"{describe_change(sum(first[n].bytes_before for n in names), sum(last[n].bytes_after for n in names), 'bytes')}; "
                     f"parameters {describe_change(sum(first[n].params_before for n in names), sum(last[n].params_after for n in names), 'params')}"
                     + (f"; {grown} module(s) would not shrink (refused unless the stage sets allow_growth: true)"
                        if grown else ""))
    return table


def summary_table(metrics: RunMetrics, output_dir) -> Table:
    c = metrics.compression
    table = Table(title="lrcompress summary", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("output", str(output_dir) if output_dir else "(not saved)")
    if c is not None:
        table.add_row("targeted modules", str(c.targeted_modules))
        if c.targeted_bytes_before is not None:
            table.add_row("targeted size", describe_change(c.targeted_bytes_before, c.targeted_bytes_after, "bytes"))
        if c.model_bytes_after is not None:
            table.add_row("whole-model size", describe_change(c.model_bytes_before, c.model_bytes_after, "bytes"))
        if c.bytes is not None:
            table.add_row("weights on disk", f"{format_bytes(c.bytes)} (dense {format_bytes(c.dense_bytes)})")
        table.add_row("targeted parameters", describe_change(c.targeted_params_before, c.targeted_params_after,
                                                             "params"))
        table.add_row("whole-model parameters", describe_change(c.model_params_before, c.model_params_after,
                                                                "params"))
    errors = [m.relative_error for m in metrics.modules]
    if errors:
        worst = max(metrics.modules, key=lambda m: m.relative_error)
        table.add_row("relative output error", f"mean {sum(errors) / len(errors):.4f}, "
                      f"worst {worst.relative_error:.4f} ({worst.name})")
    dense = metrics.eval.baseline_perplexity or {}
    for name, result in dense.items():
        table.add_row(f"dense perplexity {name}", f"{result.value:.3f}")
    for name, result in metrics.eval.perplexity.items():
        stderr = f" ± {result.stderr:.3f}" if result.stderr is not None else ""
        ratio = f" ({result.value / dense[name].value:.2f}× dense)" if name in dense else ""
        table.add_row(f"perplexity {name}", f"{result.value:.3f}{stderr}{ratio}  [{result.protocol}]")
    for label, tasks in (("dense zero-shot average", metrics.eval.baseline_lm_eval),
                         ("zero-shot average", metrics.eval.lm_eval)):
        average = zero_shot_average(tasks)    # the standard evaluation's third number, beside the two above
        if average is not None:
            documents = "all documents" if average.limit is None else f"{average.limit} documents each"
            table.add_row(label, f"{average.format()} % ({ZERO_SHOT_METRIC} of {', '.join(ZERO_SHOT_TASKS)}; "
                                 f"{documents})")
    for name, seconds in metrics.timing.items():
        table.add_row(f"time {name}", f"{seconds:.1f} s")
    return table


def inference_table(report: dict[str, Any]) -> Table:
    """bench-infer: tokens/s and memory of the dense and compressed models, and their ratios."""
    settings = report["settings"]
    table = Table(title=f"{report['checkpoint']} vs {report['dense']} — batch {settings['batch']}, "
                        f"{settings['threads']} threads, median of {settings['repeats']}")
    for column in ("model", f"prefill {settings['prompt_tokens']} tok/s", f"decode {settings['new_tokens']} tok/s",
                   "tensor MiB", "decode peak RSS +MiB"):
        table.add_column(column, justify="right")
    for name, speed in report["speeds"].items():
        peak = speed["decode_peak_rss_delta_bytes"]
        table.add_row(name, f"{speed['prefill_tokens_per_s']:.1f}", f"{speed['decode_tokens_per_s']:.2f}",
                      f"{speed['tensor_bytes'] / 2**20:.1f}", "?" if peak is None else f"{peak / 2**20:.1f}")
    ratio = report["ratios"]
    table.add_row("compressed ÷ dense", f"{ratio['prefill']:.2f}×", f"{ratio['decode']:.2f}×",
                  f"{ratio['tensor_bytes']:.2f}×", "")
    return table


def result_event(result, dry_run: bool) -> dict[str, Any]:
    """``run --log-json``'s one line on stdout: what a batch system needs to know about the run."""
    if dry_run:
        return {"event": "result", "status": "ok", "dry_run": True, "data_sources": result.data_sources,
                "plan": [vars(p) for p in result.plan],
                "allocation": result.metrics.dump().get("allocation")}   # a budget's choices (null without one)
    metrics: RunMetrics = result.metrics
    document = metrics.dump()
    return {"event": "result", "status": "ok", "dry_run": False,
            "output_dir": str(result.output_dir) if result.output_dir else None,
            "metrics": str(result.output_dir / "metrics.json") if result.output_dir else None,
            "compression": document.get("compression"),
            "perplexity": {name: r.value for name, r in metrics.eval.perplexity.items()},
            "lm_eval": document.get("eval", {}).get("lm_eval"), "timing": metrics.timing}


def inspection_table(inspection: Inspection) -> Table:
    """``lrcompress inspect``: every compressed module in layer order (``inspect_checkpoint`` sorts them),
    sizes in bytes first, with its run's record when there is one."""
    table = Table(title=f"{inspection.checkpoint} ({format_bytes(inspection.weight_bytes)} of weights)")
    for column in ("module", "kind", "shape (out×in)", "rank", "bytes after", "params after", "rel. error", "path"):
        table.add_column(column, justify="right" if column in ("rank", "bytes after", "params after", "rel. error")
                         else "left")
    for m in inspection.modules:
        r = m.record
        table.add_row(m.name, m.kind, m.shape, "–" if m.rank is None else str(m.rank),
                      format_bytes(r.bytes_after) if r is not None and r.bytes_after is not None else "?",
                      f"{r.params_after:,}" if r else "?", f"{r.relative_error:.4f}" if r else "?",
                      r.numerical_path if r else "?")
    return table


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(item, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(value, list) and all(not isinstance(item, (dict, list)) for item in value):
        return [(prefix, ", ".join(map(str, value)))]
    if isinstance(value, list):
        return [row for i, item in enumerate(value) for row in _flatten(item, f"{prefix}.{i}")]
    return [(prefix, str(value))]


def provenance_table(provenance: dict[str, Any]) -> Table:
    """The checkpoint's provenance (versions, seed, recipe and data fingerprints) as key/value rows."""
    table = Table(title="provenance", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in _flatten(provenance):
        table.add_row(key, value)
    return table


def allocation_table(allocation: AllocationResult) -> Table:
    """Per stage and module kind: the ranks a budget allocation chose against the uniform ones."""
    table = Table(title="budget allocation (rank per module kind: min / mean / max, uniform)")
    for column in ("stage", "strategy", "module kind", "modules", "min", "mean", "max", "uniform"):
        table.add_column(column, justify="left" if column in ("strategy", "module kind") else "right")
    captions = []
    for stage in allocation.stages:
        for kind, modules in stage.by_kind().items():
            ranks = [m.rank for m in modules]
            uniform = sorted({m.uniform_rank for m in modules})
            table.add_row(str(stage.stage), stage.strategy, kind, str(len(modules)), str(min(ranks)),
                          f"{sum(ranks) / len(ranks):.1f}", str(max(ranks)), "/".join(map(str, uniform)))
        captions.append(f"stage {stage.stage} ({stage.method}, {stage.strategy}): "
                        f"{stage.allocated_params:,} of a budget of {stage.budget_params:,.0f} parameters "
                        f"(uniform: {stage.uniform_params:,})")
    spectra = allocation.prepass.get("spectra", {})
    if spectra:
        captions.append(f"spectra pre-pass over the uncompressed model: {spectra.get('modules', 0)} modules, "
                        f"{spectra.get('spectra_bytes', 0) / 1024:.1f} KiB kept, {spectra.get('seconds', 0):.1f} s"
                        + (", with output gradients" if spectra.get("with_output_gradients") else ""))
    table.caption = "\n".join(captions)
    return table


def budget_tables(budget: ByteBudgetResult) -> list[Table]:
    """A byte budget's choices: how many modules and bytes each took, and the choice of every module
    (one row per decoder layer, one column per module kind, a letter per choice)."""
    letters = {label: chr(ord("A") + i) if i < 26 else str(i) for i, label in enumerate(budget.choices)}
    summary = Table(title=f"byte budget: {budget.given} ({budget.solver})")
    for column in ("key", "choice", "modules", "bytes", "bits/weight", "all modules: MiB", "est. loss"):
        summary.add_column(column, justify="left" if column in ("key", "choice") else "right")
    weights: dict[str, int] = {}
    for m in budget.modules:
        weights[m.choice] = weights.get(m.choice, 0) + m.weights
    taken = budget.by_choice()
    for label in budget.choices:
        count, size = taken.get(label, (0, 0))
        whole, loss = budget.uniform.get(label, (0, float("nan")))
        summary.add_row(letters[label], label, str(count), f"{size:,}",
                        f"{8 * size / weights[label]:.3f}" if count else "–", f"{whole / 2**20:.2f}", f"{loss:.4g}")
    summary.caption = (f"model {budget.total_bytes:,} bytes ({budget.total_bytes / 2**20:.2f} MiB) of a budget of "
                       f"{budget.budget_bytes:,}: targets {budget.target_bytes:,} "
                       f"({budget.bits_per_weight:.3f} bits per weight) + the rest {budget.fixed_bytes:,}; "
                       f"estimated loss {budget.estimated_loss:.4g} (LP bound {budget.lower_bound:.4g}; the last two "
                       "columns: every module at that choice); "
                       + (f"prices reused from {budget.prices_cache}" if budget.prices_reused
                          else f"choices priced and solved in {budget.seconds:.1f} s"))
    kinds = list(dict.fromkeys(m.kind for m in budget.modules))
    grid = Table(title="choice per module (key above)")
    grid.add_column("layer", justify="right")
    for kind in kinds:
        grid.add_column(kind, justify="center")
    rows: dict[int, dict[str, str]] = {}
    for m in budget.modules:
        rows.setdefault(m.layer, {})[m.kind] = letters[m.choice]
    for layer, cells in rows.items():
        grid.add_row(str(layer), *(cells.get(kind, "·") for kind in kinds))
    return [summary, grid]


def allocation_tables(allocation: AllocationResult) -> list[Table]:
    """Every table an allocation has: a stage allocation's ranks, a byte budget's choices."""
    return ([allocation_table(allocation)] if allocation.stages else []) + \
        (budget_tables(allocation.budget) if allocation.budget else [])
