"""One model, all of its evaluations: lrcompress's token-level perplexity, then lm-eval's tasks.

Shared by ``lrcompress run`` (compressed model, dense baseline) and ``lrcompress eval`` (any checkpoint),
so both write the same ``eval`` section of metrics.json:
``{"perplexity": {"<dataset>/<split>": ...}, "lm_eval": {"<task>": ...}}``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..data import DatasetRef
from ..models import load_model
from .baseline_cache import cached_evaluation
from .lm_eval_tasks import evaluate_tasks
from .section import BaselineCacheInfo, EvalSection, LmEvalResult
from .perplexity import EvalContext, perplexity

if TYPE_CHECKING:
    from ..recipe import EvalSpec


def evaluate_model(model: nn.Module, tokenizer, spec: "EvalSpec", context: EvalContext) -> EvalSection:
    """Every perplexity of ``spec.perplexity``, then its lm-eval tasks (``spec.lm_eval``) when it names any."""
    section = EvalSection()
    for ppl in spec.perplexity:
        context.announce(f"perplexity on {DatasetRef.of(ppl).label} (seq_len {ppl.seq_len})")
        section.perplexity[f"{ppl.dataset}/{ppl.split}"] = perplexity(model, tokenizer, ppl, context)
    if spec.lm_eval is not None:
        tasks = spec.lm_eval
        context.announce(f"lm-eval tasks {', '.join(tasks.tasks)} (limit {tasks.limit})")
        results = evaluate_tasks(model, tokenizer, list(tasks.tasks), tasks.limit, tasks.batch_size,
                                 tasks.num_fewshot, context.data_directory, context.device,
                                 include_path=getattr(tasks, "include_path", None))
        section.lm_eval = {task: LmEvalResult.model_validate(result) for task, result in results.items()}
    return section


def evaluate_checkpoint(source: str, spec: "EvalSpec", context: EvalContext, use_cache: bool = False
                        ) -> tuple[EvalSection, BaselineCacheInfo | None]:
    """Load ``source`` (HF dir, .gguf, lrcompress dir, hub id) and evaluate it; with ``use_cache`` the
    result comes from the baseline cache when this model was evaluated with these settings before
    (the model is then not even loaded). Returns (the ``eval`` section, cache info or None)."""
    def compute() -> EvalSection:
        loaded = load_model(source)
        return evaluate_model(loaded.model, loaded.tokenizer, spec, context)

    if not use_cache:
        return compute(), None
    return cached_evaluation(source, "float32", spec, context.data_directory, compute)
