"""Every dataset and task a recipe names, checked before the model is loaded (and by ``--dry-run``).

A typo in a dataset id or an unreachable hub should cost seconds, not a model load and a compression.
Files are checked for existence and the text column (parquet schema, first JSON record), hub datasets
by their metadata (nothing is downloaded), lm-eval tasks by building them (see
``eval.lm_eval_tasks.check_tasks``). Each failure is a one-line ``LrcompressError``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LrcompressError
from .sources import DatasetRef, check_source


def check_recipe_data(recipe: Any, directory: Path | None, calibration_given: bool = False) -> list[str]:
    """Check the calibration set (unless the caller holds it already), every perplexity set and the
    lm-eval tasks of ``recipe``; returns one line per dataset or task saying where it will be read from."""
    lines = ["calibration: given in memory"] if calibration_given else calibration_lines(recipe.calibration,
                                                                                           directory)
    for number, spec in enumerate(recipe.eval.perplexity):
        lines.append(f"perplexity {spec.dataset}/{spec.split}: "
                     f"{_checked(f'eval.perplexity.{number}', spec, directory)}")
    if recipe.eval.lm_eval is not None:
        from ..eval.lm_eval_tasks import check_tasks

        spec = recipe.eval.lm_eval
        try:
            checked = check_tasks(spec.tasks, directory, spec.include_path)
        except LrcompressError as error:
            raise LrcompressError(f"eval.lm_eval.tasks: {error}") from None
        lines += [f"lm-eval {task}: {where}" for task, where in checked.items()]
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
