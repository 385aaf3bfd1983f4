"""The standard evaluation's zero-shot average (``eval: {protocol: standard}``, README).

The average is the mean ``acc`` of arc_easy, arc_challenge, piqa and lambada_openai (``acc`` is the one
metric all four report; lambada_openai's is the greedy final-word accuracy). The tasks' documents are
independent samples, so the mean's standard error is sqrt(Σ seᵢ²)/k with seᵢ lm-eval's ``acc_stderr``
(sqrt(p(1-p)/(n-1)) for a mean of n 0/1 scores). It is defined only when every task was evaluated:
an average over another set of tasks would not be the same number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

ZERO_SHOT_TASKS = ("arc_easy", "arc_challenge", "piqa", "lambada_openai")
ZERO_SHOT_METRIC = "acc"


@dataclass(frozen=True)
class ZeroShotAverage:
    value: float                  # mean acc over ZERO_SHOT_TASKS
    stderr: float | None          # None when a task's stderr is undefined (one document)
    limit: int | None             # documents per task (None: every document)

    def format(self) -> str:
        return f"{100 * self.value:.2f}" + (f" ± {100 * self.stderr:.2f}" if self.stderr is not None else "")


def zero_shot_average(lm_eval: Mapping[str, Any] | None) -> ZeroShotAverage | None:
    """The average of an ``eval.lm_eval`` section (``LmEvalResult`` values), or None without all four tasks."""
    if not lm_eval or any(task not in lm_eval for task in ZERO_SHOT_TASKS):
        return None
    values, errors = [], []
    for task in ZERO_SHOT_TASKS:
        result = lm_eval[task]
        value = result.metric(ZERO_SHOT_METRIC)
        if value is None:
            return None
        values.append(value)
        errors.append(result.metric(f"{ZERO_SHOT_METRIC}_stderr"))
    stderr = None if any(e is None for e in errors) else math.sqrt(sum(e * e for e in errors)) / len(errors)
    limits = {(result.model_extra or {}).get("limit") for result in (lm_eval[t] for t in ZERO_SHOT_TASKS)}
    return ZeroShotAverage(sum(values) / len(values), stderr, limits.pop() if len(limits) == 1 else None)
