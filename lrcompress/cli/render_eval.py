"""Rich tables for the evaluation commands: lm-eval results, the regression gate, run comparisons."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from ..eval.metrics import EvalSection
from ..eval.protocol import ZERO_SHOT_METRIC, ZERO_SHOT_TASKS, zero_shot_average


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def perplexity_lines(section: EvalSection) -> list[str]:
    return [f"perplexity {r.value:.4f}  ({r.protocol}; {r.source})" for r in section.perplexity.values()]


def lm_eval_table(section: EvalSection) -> Table | None:
    tasks = section.lm_eval
    if not tasks:
        return None
    table = Table(title="lm-eval tasks")
    for column in ("task", "metric", "value ± stderr", "documents", "protocol"):
        table.add_column(column, overflow="fold")
    for task, result in tasks.items():
        for metric, protocol in result.protocols.items():
            table.add_row(task, metric, _fmt(result.metric(metric), result.metric(f"{metric}_stderr")),
                          f"{result.samples} ({result.num_fewshot}-shot)", protocol)
    average = zero_shot_average(tasks)
    if average is not None:
        table.add_row("zero-shot average", ZERO_SHOT_METRIC, _fmt(average.value, average.stderr),
                      "all" if average.limit is None else f"{average.limit} per task",
                      f"mean {ZERO_SHOT_METRIC} of {', '.join(ZERO_SHOT_TASKS)}; stderr sqrt(Σ seᵢ²)/"
                      f"{len(ZERO_SHOT_TASKS)} (the standard evaluation)")
    return table


VERDICT_STYLE = {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]", "too small": "[yellow]too small[/]"}


def gate_table(result) -> Table:
    title = "[green]PASS[/]" if result.passed else "[red]REGRESSION[/]"
    if result.passed and result.inconclusive:
        title = "[green]PASS[/] [yellow](some checks too small to decide)[/]"
    table = Table(title="lrcompress check: " + title)
    for column in ("metric", "value", "baseline", "bound", "result", "noise", "protocol"):
        table.add_column(column, overflow="fold")
    for check in result.checks:
        table.add_row(check.metric, _fmt(check.value), _fmt(check.baseline), check.bound,
                      VERDICT_STYLE[check.verdict], check.note, check.protocol)
    return table


def compare_table(header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title="lrcompress compare")
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*map(escape, row))     # run labels hold brackets ("whiten[global]"), not markup
    return table
