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

from ..eval.inspect import Inspection
from ..eval.metrics import RunMetrics
from ..pipeline import LoggingObserver, ModuleRecord, PipelineObserver
from ..pipeline.observer import LayerProgress
from ..pipeline.memory import describe_peak_memory

console = Console(stderr=True)


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
    """Two bars: layers (done/total, ETA from the mean time of a finished layer, peak memory so far), and
    the modules of the current layer."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                                 TextColumn("{task.fields[memory]}"), console=console, transient=False)
        self.layers = LayerProgress()
        self.layers_task: Any = None
        self.modules_task: Any = None

    def phase(self, description: str) -> None:
        console.log(description)

    def layers_started(self, total: int) -> None:
        self.layers = LayerProgress(total)
        self.progress.start()
        self.layers_task = self.progress.add_task("layers", total=total, memory="", eta=self.layers.eta_text())
        self.modules_task = self.progress.add_task("modules", total=0, memory="", eta="")

    def layer_started(self, index: int, modules: int) -> None:
        self.progress.reset(self.modules_task, total=modules, description=f"layer {index} modules")

    def module_done(self, record: ModuleRecord) -> None:
        self.progress.advance(self.modules_task)

    def layer_done(self, index: int, seconds: float) -> None:
        self.layers.finish(seconds)
        self.progress.update(self.layers_task, advance=1, memory=describe_peak_memory(), eta=self.layers.eta_text())

    def finished(self) -> None:
        self.progress.stop()


def make_observer(json_lines: bool = False) -> PipelineObserver:
    return RichObserver() if console.is_terminal and not json_lines else LoggingObserver()


def plan_table(plan) -> Table:
    table = Table(title="compression plan")
    for column in ("module", "stage", "method", "shape (out×in)", "params before", "params after", "rank", "note"):
        table.add_column(column, justify="right" if "params" in column or column == "rank" else "left")
    for p in plan:
        table.add_row(p.name, str(p.stage), p.method, f"{p.out_features}×{p.in_features}", f"{p.params_before:,}",
                      f"{p.params_after:,}", "–" if p.rank is None else str(p.rank),
                      "[bold red]does not shrink[/]" if p.grows else "")
    before = sum(p.params_before for p in plan)
    after = sum(p.params_after for p in plan)
    grown = sum(p.grows for p in plan)
    table.caption = (f"{len(plan)} target modules; {before:,} → {after:,} parameters "
                     f"({100 * (1 - after / before) if before else 0:.1f}% removed)"
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
        table.add_row("targeted ratio (removed)", f"{100 * c.targeted_ratio:.1f}%")
        table.add_row("whole-model ratio (removed)", f"{100 * c.model_ratio:.1f}%")
        table.add_row("parameters", f"{c.model_params_before:,} → {c.model_params_after:,}")
        if c.bytes is not None:
            table.add_row("weights on disk", f"{c.bytes / 2**20:.1f} MiB (dense {c.dense_bytes / 2**20:.1f} MiB)")
    errors = [m.relative_error for m in metrics.modules]
    if errors:
        worst = max(metrics.modules, key=lambda m: m.relative_error)
        table.add_row("relative output error", f"mean {sum(errors) / len(errors):.4f}, "
                      f"worst {worst.relative_error:.4f} ({worst.name})")
    for name, result in (metrics.eval.baseline_perplexity or {}).items():
        table.add_row(f"dense perplexity {name}", f"{result.value:.3f}")
    for name, result in metrics.eval.perplexity.items():
        table.add_row(f"perplexity {name}", f"{result.value:.3f}  [{result.protocol}]")
    for name, seconds in metrics.timing.items():
        table.add_row(f"time {name}", f"{seconds:.1f} s")
    return table


def inspection_table(inspection: Inspection) -> Table:
    """One row per compressed module of a checkpoint, with its run's record when there is one."""
    table = Table(title=f"{inspection.checkpoint} ({inspection.weight_bytes / 2**20:.1f} MiB of weights)")
    for column in ("module", "kind", "shape (out×in)", "rank", "params after", "rel. error", "path"):
        table.add_column(column)
    for m in inspection.modules:
        r = m.record
        table.add_row(m.name, m.kind, m.shape, "–" if m.rank is None else str(m.rank),
                      f"{r.params_after:,}" if r else "?", f"{r.relative_error:.4f}" if r else "?",
                      r.numerical_path if r else "?")
    return table
