"""``lrcompress compare``: several runs side by side, and the rate–distortion picture.

Each run directory holds a metrics.json (and recipe.yaml) written by ``lrcompress run``. The table lists
method, sizes (bytes first, parameters beside), every perplexity the runs share (one column per dataset,
with the ratio to the dense model's when the run recorded its baseline), the zero-shot average of the
standard evaluation (``eval.protocol``) with its standard error, and lm-eval accuracies; a dense row
holds the baseline's numbers. Each plot shows one
perplexity (the same dataset and protocol in every run) against the whole model's size in bytes, one
line per method: one plot per perplexity the runs share (both domains of the standard evaluation: WikiText-2
and web text). Runs whose perplexities were measured under different protocols still get the table
(each run's own perplexity, with its protocol) and a warning, but no plot: a picture would compare them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import LrcompressError
from ..eval.protocol import ZERO_SHOT_METRIC, ZERO_SHOT_TASKS, ZeroShotAverage, zero_shot_average
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
    zero_shot: ZeroShotAverage | None = None              # the standard evaluation's average (eval.protocol)
    baseline_zero_shot: ZeroShotAverage | None = None

    @property
    def bytes_ratio(self) -> float | None:
        return 1 - self.model_bytes / self.dense_bytes if self.model_bytes and self.dense_bytes else None


def method_label(metrics: RunMetrics, directory: Path) -> str:
    """The stages' methods joined by '+', from recipe.yaml, else from the module records. A budget
    allocation other than uniform follows its method in brackets, and output matching is named: runs that
    differ only in those are different recipes, one line each in the plot. A byte budget is
    ``budget[its choices' methods]``: its runs at several sizes are one line."""
    recipe = directory / "recipe.yaml"
    if recipe.is_file():
        data = yaml.safe_load(recipe.read_text()) or {}
        budget = data.get("budget")
        if isinstance(budget, dict):        # one line per set of choices, whatever the size
            methods = dict.fromkeys(c.get("method", "?") for c in budget.get("choices") or [] if isinstance(c, dict))
            return "budget[" + "|".join(methods) + "]"
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
                      model_bytes, dense_bytes, compression.targeted_bytes_ratio,
                      zero_shot_average(evaluation.lm_eval), zero_shot_average(evaluation.baseline_lm_eval))


def common_perplexities(runs: list[RunSummary]) -> list[str]:
    """The perplexity keys every run has, each under one protocol, in the first run's order."""
    return [key for key in runs[0].perplexity
            if all(key in run.perplexity for run in runs) and len({run.protocols[key] for run in runs}) == 1]


def common_perplexity(runs: list[RunSummary]) -> str | None:
    """The first perplexity key every run has, under one protocol (None: there is none)."""
    return next(iter(common_perplexities(runs)), None)


def _versus_dense(value: float, dense: float | None) -> str:
    return f"{value:.3f}" + (f" ({value / dense:.2f}× dense)" if dense else "")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


ZERO_SHOT_COLUMN = f"zero-shot avg ({ZERO_SHOT_METRIC}, {len(ZERO_SHOT_TASKS)} tasks, %)"


def comparison_rows(runs: list[RunSummary], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """``keys``: the shared perplexities, one column each (×dense beside when the run has the baseline);
    none: each run's first perplexity, with its protocol beside it. A zero-shot column when a run has the
    standard average; a first "dense" row when a run recorded its baseline."""
    accuracy_columns = list(dict.fromkeys(name for run in runs for name in run.accuracy))
    perplexity_columns = [f"perplexity {key}" for key in keys] if keys else ["perplexity (own protocol)", "protocol"]
    zero_shot = any(run.zero_shot for run in runs)
    header = (["run", "method", "model size", "bytes removed", "targeted bytes removed", "params removed"]
              + perplexity_columns + ([ZERO_SHOT_COLUMN] if zero_shot else []) + accuracy_columns)
    rows = []
    dense = next((run for run in runs if keys and all(key in run.baseline_perplexity for key in keys)), None)
    if dense is not None:
        rows.append([f"dense (baseline of {dense.directory})", "dense", format_bytes(dense.dense_bytes), "–", "–",
                     "–"] + [f"{dense.baseline_perplexity[key]:.3f}" for key in keys]
                    + ([dense.baseline_zero_shot.format() if dense.baseline_zero_shot else "–"] if zero_shot else [])
                    + ["–"] * len(accuracy_columns))
    for run in sorted(runs, key=lambda r: (r.method, -(r.model_bytes or 0))):
        if keys:
            ppl = [_versus_dense(run.perplexity[key], run.baseline_perplexity.get(key)) for key in keys]
        else:
            own = next(iter(run.perplexity), None)
            ppl = [f"{own}: {run.perplexity[own]:.3f}", run.protocols[own]] if own else ["–", "–"]
        rows.append([str(run.directory), run.method, format_bytes(run.model_bytes), _percent(run.bytes_ratio),
                     _percent(run.targeted_bytes_ratio), f"{100 * run.model_ratio:.1f}%"] + ppl
                    + ([run.zero_shot.format() if run.zero_shot else "–"] if zero_shot else [])
                    + [f"{run.accuracy[c]:.4f}" if c in run.accuracy else "–" for c in accuracy_columns])
    return header, rows


@dataclass
class Comparison:
    header: list[str]
    rows: list[list[str]]
    table: Path
    plot: Path | None                  # the first shared perplexity's plot (rate_distortion.png)
    warnings: list[str]
    plots: list[Path] = field(default_factory=list)    # one per shared perplexity (both domains of the standard one)


def plot_name(index: int, key: str) -> str:
    """rate_distortion.png for the first shared perplexity, rate_distortion_<key>.png for the others."""
    return "rate_distortion.png" if index == 0 else "rate_distortion_" + "".join(
        c if c.isalnum() else "-" for c in key).strip("-") + ".png"


def _plots(runs: list[RunSummary], keys: list[str], output: Path, warnings: list[str]
           ) -> tuple[list[Path], tuple[int, float] | None]:
    """One rate–distortion plot per shared perplexity (a run without a size in bytes is left out, with a
    warning), and the dense model's (bytes, first perplexity) where a run recorded its baseline."""
    unsized = [str(run.directory) for run in runs if run.model_bytes is None]
    if unsized and keys:
        warnings.append(f"no size in bytes recorded for {', '.join(unsized)}: left out of the plot")
    plots, first_dense = [], None
    for index, key in enumerate(keys):
        points: dict[str, list[tuple[float, float]]] = {}
        for run in runs:
            if run.model_bytes is not None:
                points.setdefault(run.method, []).append((run.model_bytes, run.perplexity[key]))
        dense_run = next((run for run in runs if key in run.baseline_perplexity and run.dense_bytes), None)
        dense = (dense_run.dense_bytes, dense_run.baseline_perplexity[key]) if dense_run else None
        first_dense = dense if index == 0 else first_dense
        if points:
            plots.append(plot_rate_distortion(points, output / plot_name(index, key), f"perplexity {key}", dense))
    return plots, first_dense


def compare_runs(directories: list[Path], output: Path) -> Comparison:
    """Write compare.md (and a rate_distortion*.png per perplexity the runs share under one protocol) into
    ``output``."""
    if not directories:
        raise LrcompressError("compare: name at least one run directory")
    runs = [load_run(Path(d)) for d in directories]
    keys = common_perplexities(runs)
    warnings = []
    if not keys:
        warnings.append("the runs share no perplexity measured under the same protocol (same dataset, split, "
                        "seq_len and windows): the table shows each run's own, and there is no plot")
    header, rows = comparison_rows(runs, keys)
    output.mkdir(parents=True, exist_ok=True)
    plots, dense = _plots(runs, keys, output, warnings)
    protocol = "; ".join(f"{k}: {runs[0].protocols[k]}" if len(keys) > 1 else runs[0].protocols[k] for k in keys) \
        if keys else "differs between the runs (see the protocol column)"
    lines = ["# lrcompress comparison", "", f"Perplexity protocol: {protocol}", ""]
    lines += [f"> warning: {warning}" for warning in warnings] + ([""] if warnings else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Sizes: the whole model's weights in bytes (quantization codes, scales and indices included); "
              "params removed counts stored values, which quantization does not reduce."]
    if any(run.zero_shot for run in runs):
        limits = {run.zero_shot.limit for run in runs if run.zero_shot}
        lines += ["", f"Zero-shot average: mean {ZERO_SHOT_METRIC} over {', '.join(ZERO_SHOT_TASKS)} in percent, ± its "
                  "standard error sqrt(Σ seᵢ²)/4 (lrcompress/eval/protocol.py); documents per task: "
                  + ", ".join("all" if limit is None else str(limit) for limit in sorted(limits, key=str)) + "."]
    if dense is not None:
        lines += ["", f"Dense model: {format_bytes(dense[0])}, perplexity {dense[1]:.3f}"]
    lines += ["", *(f"![rate–distortion, {key}]({plot.name})" for key, plot in zip(keys, plots))] if plots else []
    lines.append("")
    table = output / "compare.md"
    table.write_text("\n".join(lines))
    return Comparison(header, rows, table, plots[0] if plots else None, warnings, plots)
