"""One model, all of its evaluations: lrcompress's token-level perplexity, then lm-eval's tasks.

Shared by ``lrcompress run`` (compressed model, dense baseline) and ``lrcompress eval`` (any checkpoint),
so both write the same ``eval`` section of metrics.json:
``{"perplexity": {"<dataset>/<split>": ...}, "lm_eval": {"<task>": ...}}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .perplexity import WindowsNll, perplexity, windows_nll

Announce = Callable[[str], None]


def evaluate_model(model: nn.Module, tokenizer, perplexity_specs: list, lm_eval_spec, data_directory: Path | None,
                   device: torch.device, batch_size: int = 4, announce: Announce | None = None,
                   nll: WindowsNll = windows_nll) -> dict[str, Any]:
    """``perplexity_specs``: PerplexitySpec-like items; ``lm_eval_spec``: an LmEvalSpec or None; ``nll``:
    how perplexity runs the model (``eval.streamed`` for a model whose layers are not in memory)."""
    announce = announce or (lambda message: None)
    section: dict[str, Any] = {"perplexity": {}}
    for spec in perplexity_specs:
        announce(f"perplexity on {spec.dataset}/{spec.split} (seq_len {spec.seq_len})")
        result = perplexity(model, tokenizer, spec.dataset, spec.split, spec.seq_len, spec.max_windows,
                            data_directory, batch_size, device, nll, config=getattr(spec, "config", None),
                            text_column=getattr(spec, "text_column", "text"))
        section["perplexity"][f"{spec.dataset}/{spec.split}"] = result.to_dict()
    if lm_eval_spec is not None:
        from .lm_eval_tasks import evaluate_tasks

        announce(f"lm-eval tasks {', '.join(lm_eval_spec.tasks)} (limit {lm_eval_spec.limit})")
        section["lm_eval"] = evaluate_tasks(model, tokenizer, list(lm_eval_spec.tasks), lm_eval_spec.limit,
                                            lm_eval_spec.batch_size, lm_eval_spec.num_fewshot, data_directory,
                                            device, include_path=getattr(lm_eval_spec, "include_path", None))
    return section


def evaluate_checkpoint(source: str, perplexity_specs: list, lm_eval_spec, data_directory: Path | None,
                        device: torch.device, batch_size: int = 4, use_cache: bool = False,
                        announce: Announce | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load ``source`` (HF dir, .gguf, lrcompress dir, hub id) and evaluate it; with ``use_cache`` the
    result comes from the baseline cache when this model was evaluated with these settings before
    (the model is then not even loaded). Returns (the ``eval`` section, cache info or None)."""
    from ..models import load_model

    def compute() -> dict[str, Any]:
        loaded = load_model(source)
        return evaluate_model(loaded.model, loaded.tokenizer, perplexity_specs, lm_eval_spec, data_directory,
                              device, batch_size, announce)

    if not use_cache:
        return compute(), None
    from .baseline_cache import cached_evaluation, eval_settings

    return cached_evaluation(source, "float32", eval_settings(perplexity_specs, lm_eval_spec, data_directory), compute)
