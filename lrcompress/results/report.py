"""report.md: the recipe, the headline numbers, lm-eval results, the per-module table and plots of one run."""
from __future__ import annotations

from pathlib import Path

from ..pipeline.allocation import AllocationResult
from ..pipeline.bytebudget import ByteBudgetResult
from ..pipeline.records import ModuleRecord
from ..eval.section import EvalSection, LmEvalResult
from .metrics import RunMetrics, describe_change, format_bytes
from .plots import kept_rank, plot_budget_bits, plot_kept_params, plot_kept_rank, plot_module_errors

PLOTS = {"relative_error.png": "Relative output error per module across depth",
         "kept_params.png": "Kept size (bytes after / before) per module",
         "kept_rank.png": "Kept rank per layer and module kind",
         "budget_bits.png": "Byte budget: stored bits per weight per module"}


def _rank_or_sparsity(module: ModuleRecord) -> str:
    if module.rank is not None:
        return f"rank {module.rank}"
    sparsity = module.details.get("sparsity")
    return f"sparsity {sparsity:.2f}" if isinstance(sparsity, (int, float)) else "–"


def _fmt_metric(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _fmt_lm_eval(result: LmEvalResult, metric: str) -> str:
    return _fmt_metric(result.metric(metric), result.metric(metric + "_stderr"))


def lm_eval_lines(evaluation: EvalSection) -> list[str]:
    """A table of lm-eval metrics (with the dense baseline beside them when it was measured)."""
    tasks = evaluation.lm_eval or {}
    if not tasks:
        return []
    baseline = evaluation.baseline_lm_eval or {}
    lines = ["", "## Zero-shot tasks (lm-eval)", "",
             "| task | metric | value ± stderr | dense | documents | protocol |", "|---|---|---|---|---|---|"]
    for task, result in tasks.items():
        for metric, protocol in result.protocols.items():
            dense = baseline.get(task)
            lines.append(f"| {task} | {metric} | {_fmt_lm_eval(result, metric)} | "
                         f"{_fmt_lm_eval(dense, metric) if dense else '–'} | "
                         f"{result.samples} ({result.num_fewshot}-shot) | {protocol} |")
    sources = "; ".join(f"{task}: {result.metric('source')}" for task, result in tasks.items())
    lines += ["", f"Data: {sources}"]
    return lines


def allocation_lines(allocation: AllocationResult | None) -> list[str]:
    """The budget allocation per stage and module kind (ranks chosen against the uniform ones)."""
    if not allocation:
        return []
    lines = budget_lines(allocation.budget) if allocation.budget else []
    if not allocation.stages:
        return lines
    lines += ["", "## Budget allocation", "",
              "| stage | strategy | module kind | min rank | mean rank | max rank | uniform rank |",
              "|---|---|---|---|---|---|---|"]
    notes = []
    for stage in allocation.stages:
        for kind, modules in stage.by_kind().items():
            ranks = [m.rank for m in modules]
            lines.append(f"| {stage.stage} | {stage.strategy} | {kind} | {min(ranks)} | "
                         f"{sum(ranks) / len(ranks):.1f} | {max(ranks)} | {modules[0].uniform_rank} |")
        notes.append(f"Stage {stage.stage} ({stage.method}): {stage.allocated_params:,} parameters "
                     f"allocated of a budget of {stage.budget_params:,.0f} (uniform: "
                     f"{stage.uniform_params:,}); floor {stage.floor}, ceiling {stage.ceiling} of each "
                     "module's largest rank.")
    return lines + [""] + notes


def budget_lines(budget: ByteBudgetResult) -> list[str]:
    """A byte budget: modules and bytes per choice, and the total against the budget."""
    lines = ["", f"## Byte budget ({budget.given})", "", "| choice | modules | bytes |", "|---|---|---|"]
    lines += [f"| {label} | {count} | {size:,} |" for label, (count, size) in budget.by_choice().items()]
    return lines + ["", f"Model {budget.total_bytes:,} bytes of a budget of {budget.budget_bytes:,} (targets "
                        f"{budget.target_bytes:,}, {budget.bits_per_weight:.3f} bits per weight; the rest "
                        f"{budget.fixed_bytes:,}); solver {budget.solver}, estimated loss {budget.estimated_loss:.4g}, "
                        f"LP bound {budget.lower_bound:.4g}. Each module's choice is in metrics.json "
                        "(allocation.budget.modules)."]


def render_report(metrics: RunMetrics, recipe_yaml: str, plots: list[str] | None = None) -> str:
    """``plots``: file names of PNGs beside report.md to embed."""
    c = metrics.compression
    assert c is not None, "a run's metrics have a compression section"
    lines = ["# lrcompress run report", "", "## Result", ""]
    lines += ["| metric | value |", "|---|---|", f"| targeted modules | {c.targeted_modules} |"]
    if c.targeted_bytes_before is not None:
        lines.append(f"| targeted size | {describe_change(c.targeted_bytes_before, c.targeted_bytes_after, 'bytes')} |")
    if c.model_bytes_after is not None:
        lines.append(f"| whole-model size | {describe_change(c.model_bytes_before, c.model_bytes_after, 'bytes')} |")
    if c.bytes is not None:
        lines.append(f"| weights on disk | {format_bytes(c.bytes)} ({c.bytes:,} bytes; dense "
                     f"{format_bytes(c.dense_bytes)}) |")
    if c.targeted_params_before is not None:
        lines.append(f"| targeted parameters | "
                     f"{describe_change(c.targeted_params_before, c.targeted_params_after, 'params')} |")
    lines.append(f"| whole-model parameters | "
                 f"{describe_change(c.model_params_before, c.model_params_after, 'params')} |")
    for name, result in metrics.eval.perplexity.items():
        stderr = f" ± {result.stderr:.3f}" if result.stderr is not None else ""
        lines.append(f"| perplexity {name} | {result.value:.3f}{stderr} |")
    for name, result in (metrics.eval.baseline_perplexity or {}).items():
        lines.append(f"| dense perplexity {name} | {result.value:.3f} |")
    protocols = [r.protocol for r in metrics.eval.perplexity.values()]
    if protocols:
        lines += ["", "Protocol: " + "; ".join(protocols)]
    lines += lm_eval_lines(metrics.eval)
    timing = metrics.timing
    if timing:
        lines += ["", "Timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())]
    lines += ["", "## Modules", "",
              "| module | method | shape (out×in) | bytes before → after | params before → after | rank / sparsity "
              "| rel. output error | path | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in metrics.modules:
        size = (f"{format_bytes(m.bytes_before)} → {format_bytes(m.bytes_after)}"
                if m.bytes_before is not None else "–")
        lines.append(f"| {m.name} | {m.method} | {m.out_features}×{m.in_features} | {size} | "
                     f"{m.params_before:,} → {m.params_after:,} | {_rank_or_sparsity(m)} | "
                     f"{m.relative_error:.4f} | {m.numerical_path} | {m.seconds:.2f} |")
    lines += allocation_lines(metrics.allocation)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{PLOTS.get(name, name)}]({name})" for name in plots]
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(directory: Path, metrics: RunMetrics, recipe_yaml: str) -> Path:
    """report.md and its PNG plots (per-module error across depth, kept parameters) in ``directory``."""
    modules = [m for m in metrics.modules if m.layer >= 0]     # across depth: the decoder layers' records
    plots = []
    if modules:
        plot_module_errors(modules, directory / "relative_error.png")
        plot_kept_params(modules, directory / "kept_params.png")
        plots = ["relative_error.png", "kept_params.png"]
    if any(kept_rank(m) is not None for m in modules):
        stages = metrics.allocation.stages if metrics.allocation else []
        uniform = {kind: group[0].uniform_rank for stage in stages for kind, group in stage.by_kind().items()}
        plot_kept_rank(modules, directory / "kept_rank.png", uniform or None)
        plots.append("kept_rank.png")
    if metrics.allocation and metrics.allocation.budget:
        plot_budget_bits(metrics.allocation.budget.modules, directory / "budget_bits.png")
        plots.append("budget_bits.png")
    path = directory / "report.md"
    path.write_text(render_report(metrics, recipe_yaml, plots))
    return path
