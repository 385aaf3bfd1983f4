"""``lrcompress compare``: several runs side by side, and the rate–distortion picture.

Each run directory holds a metrics.json (and recipe.yaml) written by ``lrcompress run``. The table lists
method, ratios, bytes on disk, perplexities, lm-eval accuracies, the stage options and whether the run is on
the rate–distortion frontier (no other run, nor the dense model, is at most as large *and* better); the plot
shows one perplexity (the same dataset and protocol in every run) against the bytes on disk (``x="bytes"``,
the default when every run wrote a checkpoint: the only size that puts quantization, low rank and sparsity
on one axis) or against the whole-model parameter ratio removed (``x="ratio"``), one line per method chain
(``[target original]`` marks output-matched runs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import LrcompressError
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
    bytes: int | None = None               # the checkpoint's bytes on disk (None: output.save was off)
    dense_bytes: int | None = None         # the uncompressed model's parameters × bytes per parameter
    options: str = ""                      # the stages' options, e.g. "gptq bits=3 group_size=128 → eora rank=16"


IGNORED_OPTIONS = {"method", "targets", "ignore"}


def _recipe_stages(directory: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    recipe = directory / "recipe.yaml"
    if not recipe.is_file():
        return [], {}
    data = yaml.safe_load(recipe.read_text()) or {}
    stages = [stage for stage in data.get("stages") or [] if isinstance(stage, dict)]
    return stages, data.get("runtime") or {}


def stage_options(directory: Path) -> str:
    """The stages' methods and options (targets aside), joined by arrows; the output-matching target last."""
    stages, runtime = _recipe_stages(directory)
    text = " → ".join(" ".join([stage.get("method", "?")] + [f"{k}={v}" for k, v in stage.items()
                                                              if k not in IGNORED_OPTIONS and v is not None])
                      for stage in stages)
    if runtime.get("target", "layer") != "layer":
        text += f" (target {runtime['target']})"
    return text


def method_label(metrics: dict[str, Any], directory: Path) -> str:
    """The stages' methods joined by '+', from recipe.yaml, else from the module records."""
    stages, runtime = _recipe_stages(directory)
    methods = [stage.get("method", "?") for stage in stages]
    if methods:
        target = runtime.get("target", "layer")
        return "+".join(methods) + (f" [target {target}]" if target != "layer" else "")
    methods = list(dict.fromkeys(m["method"] for m in metrics.get("modules", [])))
    return "+".join(methods) or "dense"


def load_run(directory: Path) -> RunSummary:
    path = directory / "metrics.json"
    if not path.is_file():
        raise LrcompressError(f"{directory}: no metrics.json (not a run directory written by lrcompress run)")
    try:
        metrics = json.loads(path.read_text())
        compression = metrics["compression"]
        evaluation = metrics.get("eval", {})
        accuracy = {f"{task} {metric}": result[metric] for task, result in evaluation.get("lm_eval", {}).items()
                    for metric in result.get("protocols", {}) if metric.startswith("acc")}
        return RunSummary(directory, method_label(metrics, directory), compression["model_ratio"],
                          compression["targeted_ratio"],
                          {k: r["value"] for k, r in evaluation.get("perplexity", {}).items()},
                          {k: r["protocol"] for k, r in evaluation.get("perplexity", {}).items()},
                          {k: r["value"] for k, r in evaluation.get("baseline_perplexity", {}).items()}, accuracy,
                          compression.get("bytes"), compression.get("dense_bytes"), stage_options(directory))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise LrcompressError(f"{path}: not a metrics.json of lrcompress run ({type(error).__name__}: {error})") from None


def common_perplexity(runs: list[RunSummary]) -> str:
    """The first perplexity key every run has, under one protocol."""
    for key in runs[0].perplexity:
        if all(key in run.perplexity for run in runs):
            protocols = {run.protocols[key] for run in runs}
            if len(protocols) == 1:
                return key
    raise LrcompressError("the runs share no perplexity measured under the same protocol "
                          "(same dataset, split, seq_len and windows)")


def size_of(run: RunSummary, x: str) -> float:
    """The run's size on the chosen axis: bytes on disk, or the whole-model parameter ratio removed (as a
    size: 1 − ratio, so that smaller is smaller on both)."""
    return float(run.bytes) if x == "bytes" else 1.0 - run.model_ratio  # type: ignore[arg-type]


def on_frontier(runs: list[RunSummary], key: str, x: str, dense: tuple[float, float] | None = None) -> list[bool]:
    """Per run: no other run (nor the dense model) is at most as large and at least as good, better in one."""
    points = [(size_of(run, x), run.perplexity[key]) for run in runs] + ([dense] if dense else [])

    def dominated(point: tuple[float, float]) -> bool:
        return any(o[0] <= point[0] and o[1] <= point[1] and o != point for o in points)
    return [not dominated(point) for point in points[:len(runs)]]


def comparison_rows(runs: list[RunSummary], key: str, x: str = "ratio",
                    dense: tuple[float, float] | None = None) -> tuple[list[str], list[list[str]]]:
    accuracy_columns = list(dict.fromkeys(name for run in runs for name in run.accuracy))
    header = (["run", "method", "whole-model removed", "targeted removed", "MiB on disk", f"perplexity {key}"]
              + accuracy_columns + ["frontier", "stages"])
    best = dict(zip((id(run) for run in runs), on_frontier(runs, key, x, dense)))
    order = (lambda r: (r.method, -r.bytes)) if x == "bytes" else (lambda r: (r.method, r.model_ratio))
    rows = []
    for run in sorted(runs, key=order):  # type: ignore[arg-type]
        rows.append([str(run.directory), run.method, f"{100 * run.model_ratio:.1f}%", f"{100 * run.targeted_ratio:.1f}%",
                     f"{run.bytes / 2**20:.1f}" if run.bytes is not None else "–", f"{run.perplexity[key]:.3f}"]
                    + [f"{run.accuracy[c]:.4f}" if c in run.accuracy else "–" for c in accuracy_columns]
                    + ["★" if best[id(run)] else "", run.options])
    return header, rows


def compare_runs(directories: list[Path], output: Path, x: str | None = None
                 ) -> tuple[list[str], list[list[str]], Path, Path]:
    """Write compare.md and rate_distortion.png into ``output``; return the table and both paths.

    ``x``: "bytes" (bytes on disk) or "ratio" (whole-model parameters removed); default bytes when every
    run wrote a checkpoint."""
    if not directories:
        raise LrcompressError("compare: name at least one run directory")
    runs = [load_run(Path(d)) for d in directories]
    with_bytes = all(run.bytes is not None for run in runs)
    x = x or ("bytes" if with_bytes else "ratio")
    if x == "bytes" and not with_bytes:
        missing = [str(run.directory) for run in runs if run.bytes is None]
        raise LrcompressError(f"compare --x bytes: no checkpoint bytes in {', '.join(missing)} (run with output.save)")
    key = common_perplexity(runs)
    dense = next((run.baseline_perplexity[key] for run in runs if key in run.baseline_perplexity), None)
    dense_size = runs[0].dense_bytes if x == "bytes" else 1.0
    dense_point = (float(dense_size), dense) if dense is not None and dense_size is not None else None
    header, rows = comparison_rows(runs, key, x, dense_point)
    points: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        points.setdefault(run.method, []).append((size_of(run, x) if x == "bytes" else run.model_ratio,
                                                  run.perplexity[key]))
    frontier = [(size_of(run, x) if x == "bytes" else run.model_ratio, run.perplexity[key])
                for run, best in zip(runs, on_frontier(runs, key, x, dense_point)) if best]
    output.mkdir(parents=True, exist_ok=True)
    axis = (dict(x_label="bytes on disk (MiB)", x_scale=2.0**-20, dense_x=float(dense_size or 0))
            if x == "bytes" else {})
    plot = plot_rate_distortion(points, output / "rate_distortion.png", f"perplexity {key}", dense,
                                frontier=frontier, **axis)
    lines = ["# lrcompress comparison", "", f"Perplexity protocol: {runs[0].protocols[key]}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if dense is not None:
        size = f", {dense_size / 2**20:.1f} MiB of parameters" if x == "bytes" and dense_size else ""
        lines += ["", f"Dense model: perplexity {dense:.3f}{size}"]
    lines += ["", "frontier ★: no other run (nor the dense model) is at most as large and at least as good"
              + (" (size = bytes on disk)" if x == "bytes" else " (size = whole-model parameters kept)")]
    lines += ["", f"![rate–distortion]({plot.name})", ""]
    table = output / "compare.md"
    table.write_text("\n".join(lines))
    return header, rows, table, plot
