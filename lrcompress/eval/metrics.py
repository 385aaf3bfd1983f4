"""metrics.json: compression accounting, evaluation results, timing, per-module records."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from ..pipeline.records import ModuleRecord


def unique_param_count(model: nn.Module) -> int:
    """Stored values counted once even when tied (embeddings shared with the LM head); a compressed
    module counts its ``stored_params()`` (quantization codes live in buffers, not parameters)."""
    from ..modules import compressed_modules

    compressed = compressed_modules(model)
    inside = {id(p) for _, module in compressed for p in module.parameters()}
    total = sum(module.stored_params() for _, module in compressed)
    seen: set[int] = set()
    for parameter in model.parameters():  # .parameters() already yields shared tensors once
        if id(parameter) not in seen and id(parameter) not in inside:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def compression_summary(records: Iterable[ModuleRecord], model_params_before: int, model_params_after: int,
                        bytes_on_disk: int | None, bytes_per_param: int) -> dict[str, Any]:
    """Ratios are fractions *removed*. A module compressed by several stages counts once: its first
    stage's "before" and its last stage's "after"."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    bytes_before: dict[str, int | None] = {}
    bytes_after: dict[str, int | None] = {}
    for record in records:
        before.setdefault(record.name, record.params_before)
        after[record.name] = record.params_after
        bytes_before.setdefault(record.name, record.bytes_before)
        bytes_after[record.name] = record.bytes_after
    targeted_before, targeted_after = sum(before.values()), sum(after.values())
    byte_counts = None
    if all(v is not None for v in [*bytes_before.values(), *bytes_after.values()]):
        byte_counts = (sum(bytes_before.values()), sum(bytes_after.values()))  # type: ignore[arg-type]
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
        "targeted_bytes_before": byte_counts[0] if byte_counts else None,
        "targeted_bytes_after": byte_counts[1] if byte_counts else None,
        "targeted_bytes_ratio": 1 - byte_counts[1] / byte_counts[0] if byte_counts and byte_counts[0] else None,
        # the whole model's weights in memory: dense size, with the targeted modules' bytes swapped
        "model_bytes_before": model_params_before * bytes_per_param,
        "model_bytes_after": (model_params_before * bytes_per_param - byte_counts[0] + byte_counts[1])
        if byte_counts else None,
        "model_bytes_ratio": (byte_counts[0] - byte_counts[1]) / (model_params_before * bytes_per_param)
        if byte_counts and model_params_before else None,
        "accounting": ("params = stored weight values (low-rank r·(m+n), sparse kept values, quantized one "
                       "code per weight; sparse dictionaries d_in·k (a shared one split among its group) + s·d_out "
                       "values + indices at their byte size in units of one value; + bias); bytes = every tensor written, scales/zeros/masks/indices "
                       "included; bytes are the primary size (quantization keeps every weight as a code, so its parameter "
                       "count does not shrink); ratios are fractions removed"),
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


def format_bytes(count: int | float | None) -> str:
    """1.5 GiB, 432.0 MiB, 12.3 KiB, 512 B."""
    if count is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def describe_change(before: int, after: int, unit: str) -> str:
    """"a → b (x% removed)", or "(+x% …)" when it grew: never a negative "removed"."""
    text = f"{before:,} → {after:,}" if unit == "params" else f"{format_bytes(before)} → {format_bytes(after)}"
    if not before:
        return text
    change = 1 - after / before
    return text + (f" ({100 * change:.1f}% removed)" if change >= 0 else f" (+{-100 * change:.1f}%)")
