"""``lrcompress compare``: several runs side by side, and the rate–distortion picture.

Each run directory holds a metrics.json (and recipe.yaml) written by ``lrcompress run``. The table lists
method, ratios, perplexities and lm-eval accuracies; the plot shows one perplexity (the same dataset and
protocol in every run) against the whole-model ratio removed, one line per method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import LrcompressError
from .metrics import RunMetrics
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


def method_label(metrics: RunMetrics, directory: Path) -> str:
    """The stages' methods joined by '+', from recipe.yaml, else from the module records."""
    recipe = directory / "recipe.yaml"
    if recipe.is_file():
        stages = (yaml.safe_load(recipe.read_text()) or {}).get("stages") or []
        methods = [stage.get("method", "?") for stage in stages if isinstance(stage, dict)]
        if methods:
            return "+".join(methods)
    methods = list(dict.fromkeys(m.method for m in metrics.modules))
    return "+".join(methods) or "dense"


def load_run(directory: Path) -> RunSummary:
    path = directory / "metrics.json"
    if not path.is_file():
        raise LrcompressError(f"{directory}: no metrics.json (not a run directory written by lrcompress run)")
    metrics = RunMetrics.load(path)
    if metrics.compression is None:
        raise LrcompressError(f"{path}: not a metrics.json of lrcompress run (no compression section)")
    evaluation = metrics.eval
    accuracy = {f"{task} {metric}": result.metric(metric) for task, result in (evaluation.lm_eval or {}).items()
                for metric in result.protocols if metric.startswith("acc")}
    return RunSummary(directory, method_label(metrics, directory), metrics.compression.model_ratio,
                      metrics.compression.targeted_ratio,
                      {k: r.value for k, r in evaluation.perplexity.items()},
                      {k: r.protocol for k, r in evaluation.perplexity.items()},
                      {k: r.value for k, r in (evaluation.baseline_perplexity or {}).items()}, accuracy)


def common_perplexity(runs: list[RunSummary]) -> str:
    """The first perplexity key every run has, under one protocol."""
    for key in runs[0].perplexity:
        if all(key in run.perplexity for run in runs):
            protocols = {run.protocols[key] for run in runs}
            if len(protocols) == 1:
                return key
    raise LrcompressError("the runs share no perplexity measured under the same protocol "
                          "(same dataset, split, seq_len and windows)")


def comparison_rows(runs: list[RunSummary], key: str) -> tuple[list[str], list[list[str]]]:
    accuracy_columns = list(dict.fromkeys(name for run in runs for name in run.accuracy))
    header = ["run", "method", "whole-model removed", "targeted removed", f"perplexity {key}"] + accuracy_columns
    rows = []
    for run in sorted(runs, key=lambda r: (r.method, r.model_ratio)):
        rows.append([str(run.directory), run.method, f"{100 * run.model_ratio:.1f}%", f"{100 * run.targeted_ratio:.1f}%",
                     f"{run.perplexity[key]:.3f}"]
                    + [f"{run.accuracy[c]:.4f}" if c in run.accuracy else "–" for c in accuracy_columns])
    return header, rows


def compare_runs(directories: list[Path], output: Path) -> tuple[list[str], list[list[str]], Path, Path]:
    """Write compare.md and rate_distortion.png into ``output``; return the table and both paths."""
    if not directories:
        raise LrcompressError("compare: name at least one run directory")
    runs = [load_run(Path(d)) for d in directories]
    key = common_perplexity(runs)
    header, rows = comparison_rows(runs, key)
    points: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        points.setdefault(run.method, []).append((run.model_ratio, run.perplexity[key]))
    dense = next((run.baseline_perplexity[key] for run in runs if key in run.baseline_perplexity), None)
    output.mkdir(parents=True, exist_ok=True)
    plot = plot_rate_distortion(points, output / "rate_distortion.png", f"perplexity {key}", dense)
    lines = ["# lrcompress comparison", "", f"Perplexity protocol: {runs[0].protocols[key]}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if dense is not None:
        lines += ["", f"Dense model: perplexity {dense:.3f}"]
    lines += ["", f"![rate–distortion]({plot.name})", ""]
    table = output / "compare.md"
    table.write_text("\n".join(lines))
    return header, rows, table, plot
