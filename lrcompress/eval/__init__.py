"""Evaluation: perplexity, metrics.json and the run report."""
from .metrics import EvalSection, RunMetrics, compression_summary, read_eval_section, unique_param_count, versions
from .perplexity import EvalContext, PerplexityResult, perplexity
from .report import render_report, write_report

__all__ = ["EvalContext", "EvalSection", "PerplexityResult", "RunMetrics", "compression_summary", "perplexity",
           "read_eval_section", "render_report", "unique_param_count", "versions", "write_report"]
