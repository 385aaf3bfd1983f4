"""The Python API: ``lrcompress.run`` (a recipe, from Python) and ``lrcompress.load`` (a checkpoint).

``run`` takes what the CLI takes, plus what only a Python caller can have: a model already in memory
and calibration data already in memory. Everything else (validation, the data checks, the pipeline,
the checkpoint, the evaluation) is the CLI's own code path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import LrcompressError
from .recipe import Recipe, apply_overrides, load_recipe, parse_recipe
from .runner import GivenInputs, RunResult, run_recipe


def run(recipe: Recipe | str | Path | Mapping[str, Any], model: nn.Module | None = None, dataset: Any = None, *,
        tokenizer: Any = None, overrides: Sequence[str] = (), data_dir: str | Path | None = None,
        dry_run: bool = False, observer: Any = None) -> RunResult:
    """Run a recipe; returns a ``RunResult`` (``output_dir``, ``metrics``, ``plan``, the compressed ``model``).

    ``recipe``: a YAML path, a dict with the YAML's structure, or a ``Recipe``; ``overrides`` as
    ``--set`` (``["stages.0.ratio=0.3"]``).
    ``model``: a causal LM already in memory (e.g. ``AutoModelForCausalLM.from_pretrained(...)``), used
    instead of ``model.path`` and compressed *in place*; ``tokenizer`` defaults to the one saved with
    ``model.path`` (or the model's ``name_or_path``). The recipe's ``model`` section may then be left out.
    ``dataset``: calibration data already in memory instead of ``calibration.dataset``: a string, a list
    of records (strings, or message lists with ``calibration.chat_template``), a ``datasets.Dataset``
    (its ``calibration.text_column``), or a LongTensor of token windows (num_samples × seq_len, used as is).
    """
    parsed = _as_recipe(recipe, model, list(overrides))
    loaded = None
    if model is not None:
        from .models.loading import LoadedModel

        if parsed.runtime.lazy:
            raise LrcompressError("runtime.lazy reads layers from files; it cannot take a model in memory")
        if parsed.eval.baseline:
            raise LrcompressError("eval.baseline caches the dense evaluation by the model's files; with a model in "
                                  "memory evaluate it before compressing (lrcompress.eval is the CLI's `eval`)")
        loaded = LoadedModel(model.eval(), tokenizer or _tokenizer_for(parsed, model), parsed.model.path, None)
    given = GivenInputs(loaded, _calibration(dataset, parsed, loaded.tokenizer if loaded else tokenizer,
                                             model is None))
    return run_recipe(parsed, observer, str(data_dir) if data_dir else None, dry_run, given)


def _as_recipe(recipe: Recipe | str | Path | Mapping[str, Any], model: nn.Module | None,
               overrides: list[str]) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            return parse_recipe(apply_overrides(recipe.model_dump(), overrides, "<recipe>"))
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    data = dict(recipe)
    if model is not None and "model" not in data:
        data["model"] = {"path": getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory model>"}
    return parse_recipe(apply_overrides(data, overrides, "<recipe dict>"), "<recipe dict>")


def _tokenizer_for(recipe: Recipe, model: nn.Module):
    from transformers import AutoTokenizer

    source = recipe.model.path
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise LrcompressError(f"no tokenizer for the model in memory (tried {source!r}: {type(error).__name__}); "
                              "pass tokenizer=") from None


def _calibration(dataset: Any, recipe: Recipe, tokenizer: Any, tokenizer_later: bool):
    """``dataset`` as what the runner takes: a TextSource or token windows (None: the recipe's)."""
    from .data.sources import text_source

    if dataset is None or isinstance(dataset, torch.Tensor):
        if isinstance(dataset, torch.Tensor) and (dataset.dim() != 2 or dataset.dtype != torch.long):
            raise LrcompressError(f"dataset: token windows are a 2-D LongTensor, got {tuple(dataset.shape)} "
                                  f"{dataset.dtype}")
        return dataset
    cal = recipe.calibration
    if isinstance(dataset, str):
        values, description = [dataset], "text given in memory"
    elif hasattr(dataset, "column_names"):                   # a datasets.Dataset
        if cal.text_column not in dataset.column_names:
            raise LrcompressError(f"dataset has no column {cal.text_column!r}; columns: "
                                  f"{', '.join(dataset.column_names)} (set calibration.text_column)")
        values, description = list(dataset[cal.text_column]), f"dataset given in memory (column {cal.text_column})"
    else:
        values, description = list(dataset), "records given in memory"
    if cal.chat_template and tokenizer is None and not tokenizer_later:
        raise LrcompressError("calibration.chat_template needs a tokenizer")
    if cal.chat_template and tokenizer is None:       # the recipe's model is loaded by the runner: its tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    return text_source(values, description, cal.text_column, tokenizer if cal.chat_template else None)
