"""Every dataset and task a recipe names, checked before the model is loaded (and by ``--dry-run``).

A typo in a dataset id or an unreachable hub should cost seconds, not a model load and a compression.
Files are checked for existence and the text column (parquet schema, first JSON record), hub datasets
by their metadata (nothing is downloaded). Each failure is a one-line ``LrcompressError``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LrcompressError
from .sources import DatasetRef, check_source


def check_recipe_data(recipe: Any, directory: Path | None, calibration_given: bool = False) -> list[str]:
    """Check the calibration set (unless the caller holds it already: every source of a mixture) and every
    perplexity set of ``recipe``; returns one line per dataset saying where it will be read from. (The
    lm-eval tasks are evaluation's to check: ``preflight.check_data`` adds them.)"""
    lines = ["calibration: given in memory"] if calibration_given else calibration_lines(recipe.calibration,
                                                                                           directory)
    for number, spec in enumerate(recipe.eval.perplexity):
        lines.append(f"perplexity {spec.dataset}/{spec.split}: "
                     f"{_checked(f'eval.perplexity.{number}', spec, directory)}")
    return lines


def calibration_lines(spec: Any, directory: Path | None) -> list[str]:
    """Where each calibration source is read from: "calibration: WHERE" for the one-source form, one
    "calibration.sources.I (N windows) DATASET/SPLIT: WHERE" line per source of a mixture."""
    if not spec.is_mixture:
        return [f"calibration: {_checked('calibration', spec, directory)}"]
    return [f"calibration.sources.{i} ({part.num_samples} windows) {part.dataset}/{part.split}: "
            f"{_checked(f'calibration.sources.{i}', part, directory)}" for i, part in enumerate(spec.parts())]


def _checked(section: str, spec: Any, directory: Path | None) -> str:
    try:
        return check_source(DatasetRef.of(spec), directory)
    except LrcompressError as error:
        raise LrcompressError(f"{section}.dataset {spec.dataset!r}: {error}") from None
