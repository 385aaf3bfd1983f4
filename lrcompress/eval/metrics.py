"""metrics.json: compression accounting, evaluation results, timing, per-module records."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from ..pipeline.records import ModuleRecord


def unique_param_count(model: nn.Module) -> int:
    """Parameters counted once even when tied (embeddings shared with the LM head)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():  # .parameters() already yields shared tensors once
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def compression_summary(records: Iterable[ModuleRecord], model_params_before: int, model_params_after: int,
                        bytes_on_disk: int | None, bytes_per_param: int) -> dict[str, Any]:
    """Ratios are fractions *removed*. A module compressed by several stages counts once: its first
    stage's "before" and its last stage's "after"."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for record in records:
        before.setdefault(record.name, record.params_before)
        after[record.name] = record.params_after
    targeted_before, targeted_after = sum(before.values()), sum(after.values())
    return {
        "targeted_modules": len(before),
        "targeted_params_before": targeted_before,
        "targeted_params_after": targeted_after,
        "targeted_ratio": 1 - targeted_after / targeted_before if targeted_before else 0.0,
        "model_params_before": model_params_before,
        "model_params_after": model_params_after,
        "model_ratio": 1 - model_params_after / model_params_before if model_params_before else 0.0,
        "bytes": bytes_on_disk,
        "dense_bytes": model_params_before * bytes_per_param,
        "accounting": "stored values; low-rank modules store r·(m+n) (+ bias); ratios are fractions removed",
    }


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"lrcompress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    from ..checkpoint.layout import write_atomic

    write_atomic(path, json.dumps(metrics, indent=2, default=str))
