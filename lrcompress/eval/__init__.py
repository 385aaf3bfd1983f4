"""Evaluation: perplexity, lm-eval tasks, streamed evaluation, the suite a run evaluates with."""
from .perplexity import EvalContext, PerplexityResult, perplexity

__all__ = ["EvalContext", "PerplexityResult", "perplexity"]
