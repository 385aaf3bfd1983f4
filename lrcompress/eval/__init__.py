"""Evaluation: perplexity, metrics.json and the run report."""
from .metrics import compression_summary, unique_param_count, versions, write_metrics
from .perplexity import PerplexityResult, perplexity
from .report import render_report, write_report

__all__ = ["PerplexityResult", "compression_summary", "perplexity", "render_report", "unique_param_count",
           "versions", "write_metrics", "write_report"]
