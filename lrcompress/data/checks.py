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
    """Check the calibration set (unless the caller holds it already) and every perplexity set of ``recipe``;
    returns one line per dataset saying where it will be read from. (The lm-eval tasks are evaluation's to
    check: ``preflight.check_data`` adds them.)"""
    lines = ["calibration: given in memory" if calibration_given
             else f"calibration: {_checked('calibration', recipe.calibration, directory)}"]
    for number, spec in enumerate(recipe.eval.perplexity):
        lines.append(f"perplexity {spec.dataset}/{spec.split}: "
                     f"{_checked(f'eval.perplexity.{number}', spec, directory)}")
    return lines


def _checked(section: str, spec: Any, directory: Path | None) -> str:
    try:
        return check_source(DatasetRef.of(spec), directory)
    except LrcompressError as error:
        raise LrcompressError(f"{section}.dataset {spec.dataset!r}: {error}") from None
