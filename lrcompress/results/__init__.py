"""A run's records and what is read from them: metrics.json, the report, plots, comparisons, the gate, inspection."""
from .metrics import EvalSection, RunMetrics, compression_summary, read_eval_section, unique_param_count, versions
from .report import render_report, write_report

__all__ = ["EvalSection", "RunMetrics", "compression_summary", "read_eval_section", "render_report",
           "unique_param_count", "versions", "write_report"]
