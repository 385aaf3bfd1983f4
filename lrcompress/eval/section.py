"""What an evaluation gives, typed: perplexities and lm-eval results of a model (and of its dense baseline).

The ``eval`` section of metrics.json, of a baseline cache entry and of ``lrcompress eval --output``; the
run's other records (``results.metrics``) are built around it.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from .perplexity import PerplexityResult


class Section(BaseModel):
    """A section of a JSON document lrcompress writes: unknown keys refused, absent sections left out."""

    model_config = ConfigDict(extra="forbid")
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        data = handler(self)
        for name in self.OMITTED_WHEN_NONE:
            if data.get(name, 0) is None:
                del data[name]
        return data

    def dump(self) -> dict[str, Any]:
        return self.model_dump()


class LmEvalResult(BaseModel):
    """One lm-eval task: its metrics (``acc``, ``acc_stderr``, ``perplexity``, ... as extra keys, named by
    lm-eval) and ``protocols`` (metric → what it measures)."""

    model_config = ConfigDict(extra="allow")
    protocols: dict[str, str]
    samples: int | None = None
    num_fewshot: int = 0

    def metric(self, name: str) -> Any:
        return (self.model_extra or {}).get(name)


class BaselineCacheInfo(Section):
    fingerprint: str
    path: str
    hit: bool


class EvalSection(Section):
    """``{"perplexity": {"<dataset>/<split>": ...}, "lm_eval": {"<task>": ...}}`` and, in a run with
    ``eval.baseline``, the dense model's numbers beside them."""

    perplexity: dict[str, PerplexityResult] = Field(default_factory=dict)
    lm_eval: dict[str, LmEvalResult] | None = None
    baseline_perplexity: dict[str, PerplexityResult] | None = None
    baseline_lm_eval: dict[str, LmEvalResult] | None = None
    baseline_cache: BaselineCacheInfo | None = None
    OMITTED_WHEN_NONE = ("lm_eval", "baseline_perplexity", "baseline_lm_eval", "baseline_cache")
