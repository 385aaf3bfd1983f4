"""``lrcompress compare``: several runs side by side, and the rate–distortion picture.

Each run directory holds a metrics.json (and recipe.yaml) written by ``lrcompress run``. The table lists
method, sizes (bytes first, parameters beside), perplexities and lm-eval accuracies; the plot shows one
perplexity (the same dataset and protocol in every run) against the whole model's size in bytes, one
line per method. Runs whose perplexities were measured under different protocols still get the table
(each run's own perplexity, with its protocol) and a warning, but no plot: a picture would compare them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import LrcompressError
from .metrics import RunMetrics, format_bytes
from .plots import plot_rate_distortion


@dataclass
class RunSummary:
    directory: Path
    method: str
    model_ratio: float
    targeted_ratio: float
    perplexity: dict[str, float]
    protocols: dict[str, str]
    baseline_perplexity: dict[str, float]
    accuracy: dict[str, float] = field(default_factory=dict)    # "task metric" -> value
    model_bytes: int | None = None         # the whole model's weights after compression
    dense_bytes: int | None = None
    targeted_bytes_ratio: float | None = None

    @property
    def bytes_ratio(self) -> float | None:
        return 1 - self.model_bytes / self.dense_bytes if self.model_bytes and self.dense_bytes else None


def method_label(metrics: RunMetrics, directory: Path) -> str:
    """The stages' methods joined by '+', from recipe.yaml, else from the module records. A budget
    allocation other than uniform follows its method in brackets, and output matching is named: runs that
    differ only in those are different recipes, one line each in the plot."""
    recipe = directory / "recipe.yaml"
    if recipe.is_file():
        data = yaml.safe_load(recipe.read_text()) or {}
        stages = [stage for stage in data.get("stages") or [] if isinstance(stage, dict)]
        methods = [stage.get("method", "?") + _allocation_suffix(stage) for stage in stages]
        if methods:
            target = (data.get("runtime") or {}).get("target", "layer")
            return "+".join(methods) + ("" if target == "layer" else f" (target {target})")
    methods = list(dict.fromkeys(m.method for m in metrics.modules))
    return "+".join(methods) or "dense"


def _allocation_suffix(stage: dict) -> str:
    allocation = stage.get("allocation")
    strategy = allocation.get("strategy") if isinstance(allocation, dict) else allocation
    return "" if strategy in (None, "uniform") else f"[{strategy}]"


def load_run(directory: Path) -> RunSummary:
    path = directory / "metrics.json"
    if not path.is_file():
        raise LrcompressError(f"{directory}: no metrics.json (not a run directory written by lrcompress run)")
    metrics = RunMetrics.load(path)
    compression = metrics.compression
    if compression is None:
        raise LrcompressError(f"{path}: not a metrics.json of lrcompress run (no compression section)")
    evaluation = metrics.eval
    accuracy = {f"{task} {metric}": result.metric(metric) for task, result in (evaluation.lm_eval or {}).items()
                for metric in result.protocols if metric.startswith("acc")}
    # bytes: the in-memory accounting when recorded, else (older runs) the weights on disk
    model_bytes = compression.model_bytes_after or compression.bytes
    dense_bytes = compression.model_bytes_before or compression.dense_bytes
    return RunSummary(directory, method_label(metrics, directory), compression.model_ratio,
                      compression.targeted_ratio,
                      {k: r.value for k, r in evaluation.perplexity.items()},
                      {k: r.protocol for k, r in evaluation.perplexity.items()},
                      {k: r.value for k, r in (evaluation.baseline_perplexity or {}).items()}, accuracy,
                      model_bytes, dense_bytes, compression.targeted_bytes_ratio)


def common_perplexity(runs: list[RunSummary]) -> str | None:
    """The first perplexity key every run has, under one protocol (None: there is none)."""
    for key in runs[0].perplexity:
        if all(key in run.perplexity for run in runs):
            protocols = {run.protocols[key] for run in runs}
            if len(protocols) == 1:
                return key
    return None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def comparison_rows(runs: list[RunSummary], key: str | None) -> tuple[list[str], list[list[str]]]:
    """``key``: the shared perplexity; None: each run's first perplexity, with its protocol beside it."""
    accuracy_columns = list(dict.fromkeys(name for run in runs for name in run.accuracy))
    perplexity_columns = [f"perplexity {key}"] if key else ["perplexity (own protocol)", "protocol"]
    header = (["run", "method", "model size", "bytes removed", "targeted bytes removed", "params removed"]
              + perplexity_columns + accuracy_columns)
    rows = []
    for run in sorted(runs, key=lambda r: (r.method, -(r.model_bytes or 0))):
        if key:
            ppl = [f"{run.perplexity[key]:.3f}"]
        else:
            own = next(iter(run.perplexity), None)
            ppl = [f"{own}: {run.perplexity[own]:.3f}", run.protocols[own]] if own else ["–", "–"]
        rows.append([str(run.directory), run.method, format_bytes(run.model_bytes), _percent(run.bytes_ratio),
                     _percent(run.targeted_bytes_ratio), f"{100 * run.model_ratio:.1f}%"] + ppl
                    + [f"{run.accuracy[c]:.4f}" if c in run.accuracy else "–" for c in accuracy_columns])
    return header, rows


@dataclass
class Comparison:
    header: list[str]
    rows: list[list[str]]
    table: Path
    plot: Path | None
    warnings: list[str]


def compare_runs(directories: list[Path], output: Path) -> Comparison:
    """Write compare.md (and rate_distortion.png when the runs share a perplexity protocol) into ``output``."""
    if not directories:
        raise LrcompressError("compare: name at least one run directory")
    runs = [load_run(Path(d)) for d in directories]
    key = common_perplexity(runs)
    warnings = []
    if key is None:
        warnings.append("the runs share no perplexity measured under the same protocol (same dataset, split, "
                        "seq_len and windows): the table shows each run's own, and there is no plot")
    header, rows = comparison_rows(runs, key)
    output.mkdir(parents=True, exist_ok=True)
    plot, dense = None, None
    if key is not None:
        points: dict[str, list[tuple[float, float]]] = {}
        unsized = [str(run.directory) for run in runs if run.model_bytes is None]
        for run in runs:
            if run.model_bytes is not None:
                points.setdefault(run.method, []).append((run.model_bytes, run.perplexity[key]))
        if unsized:
            warnings.append(f"no size in bytes recorded for {', '.join(unsized)}: left out of the plot")
        dense_run = next((run for run in runs if key in run.baseline_perplexity and run.dense_bytes), None)
        dense = (dense_run.dense_bytes, dense_run.baseline_perplexity[key]) if dense_run else None
        if points:
            plot = plot_rate_distortion(points, output / "rate_distortion.png", f"perplexity {key}", dense)
    protocol = runs[0].protocols[key] if key else "differs between the runs (see the protocol column)"
    lines = ["# lrcompress comparison", "", f"Perplexity protocol: {protocol}", ""]
    lines += [f"> warning: {warning}" for warning in warnings] + ([""] if warnings else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Sizes: the whole model's weights in bytes (quantization codes, scales and indices included); "
              "params removed counts stored values, which quantization does not reduce."]
    if dense is not None:
        lines += ["", f"Dense model: {format_bytes(dense[0])}, perplexity {dense[1]:.3f}"]
    if plot is not None:
        lines += ["", f"![rate–distortion]({plot.name})"]
    lines.append("")
    table = output / "compare.md"
    table.write_text("\n".join(lines))
    return Comparison(header, rows, table, plot, warnings)
