"""Checks a run makes before it loads the model: everything a user can get wrong and fix, found in
seconds instead of after the load (or, worse, after the compression).

- the recipe asks for work: at least one stage, and every stage's targets match some module of the
  model (the module names come from a skeleton on the meta device, built from config.json alone);
- every module a shrinking method targets gets smaller (``check_growth``; ``allow_growth`` opts out);
- sequence lengths fit the model's ``max_position_embeddings``;
- the calibration and evaluation data exist (names, splits, files, lm-eval task files), and the run
  does not evaluate on the very text it calibrates on unless ``eval.allow_calibration_split`` says so;
- a batch larger than the calibration set is pointed out (harmless, but probably not what was meant).

The output directory is claimed separately (``checkpoint.lock.claim_output_dir``): only the process that
writes does it, and it must hold the directory until the run ends.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from torch import nn

from .data import locate_text
from .errors import LrcompressError, RecipeError
from .models import adapter_for
from .models.loading import model_skeleton
from .pipeline import Stage
from .pipeline.blocks import is_block_stage
from .pipeline.plan import PlannedModule, plan_modules
from .pipeline.targets import is_linear_like, select_targets
from .recipe import Recipe

log = logging.getLogger(__name__)
SHOWN = 4          # modules named in a message


class PlanRefused(RecipeError):
    """The plan itself is the problem (modules that would grow); carries it, so ``--dry-run`` shows it."""

    def __init__(self, message: str, plan: list[PlannedModule]) -> None:
        super().__init__(message)
        self.plan = plan


def preflight(recipe: Recipe, stages: list[Stage], data_directory: Path | None,
              announce: Callable[[str], None] | None = None) -> list[PlannedModule]:
    """Run every check that needs no weights; return the plan (computed on the meta skeleton)."""
    announce = announce or log.warning
    if not recipe.stages:
        raise RecipeError("the recipe has no stages: nothing would be compressed. Add a stage (e.g. "
                          "stages: [{method: whiten, ratio: 0.2}]), or use `lrcompress eval` to evaluate a model as it is")
    check_data(recipe, data_directory)
    skeleton = model_skeleton(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code)
    check_sequence_lengths(recipe, skeleton)
    plan = plan_modules(skeleton, stages)
    check_targets(stages, plan, skeleton)
    if recipe.runtime.batch_size > recipe.calibration.num_samples:
        announce(f"runtime.batch_size {recipe.runtime.batch_size} is larger than calibration.num_samples "
                 f"{recipe.calibration.num_samples}: every forward call holds all {recipe.calibration.num_samples} "
                 "windows (harmless; did you mean more samples?)")
    return plan


def check_data(recipe: Recipe, directory: Path | None) -> None:
    """Calibration and evaluation data exist; evaluation never reads the calibration text unless asked."""
    cal = recipe.calibration
    calibration = _located("calibration", cal.dataset, cal.split, directory)
    for i, spec in enumerate(recipe.eval.perplexity):
        where = _located(f"eval.perplexity.{i}", spec.dataset, spec.split, directory)
        if where == calibration and not recipe.eval.allow_calibration_split:
            raise RecipeError(f"eval.perplexity.{i} evaluates on the text calibration reads ({where}): the "
                              "perplexity would be optimistic. Calibrate and evaluate on different texts (e.g. calibration.split: "
                              "validation, eval split: test), or set eval.allow_calibration_split: true if this is intended")
    if recipe.eval.lm_eval is not None and directory is not None:
        from .eval.lm_eval_tasks import LOCAL_TASKS
        from .eval.task_data import local_files

        for task in recipe.eval.lm_eval.tasks:
            if task in LOCAL_TASKS:
                try:
                    local_files(task, directory)
                except LrcompressError as error:
                    raise LrcompressError(f"eval.lm_eval.tasks: {error}") from None


def _located(key: str, dataset: str, split: str, directory: Path | None) -> str:
    try:
        return locate_text(dataset, split, directory)
    except LrcompressError as error:
        raise LrcompressError(f"{key}: {error}") from None


def check_sequence_lengths(recipe: Recipe, model: nn.Module) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    lengths = [("calibration.seq_len", recipe.calibration.seq_len)]
    lengths += [(f"eval.perplexity.{i}.seq_len", spec.seq_len) for i, spec in enumerate(recipe.eval.perplexity)]
    for key, value in lengths:
        if value > limit:
            raise RecipeError(f"{key} is {value}, above the model's max_position_embeddings {limit} "
                              f"({recipe.model.path}); use at most {limit}")


def check_targets(stages: list[Stage], plan: list[PlannedModule], model: nn.Module) -> None:
    """Every stage compresses something; when one would not, say whether its targets or its ignore list
    is the cause and show what the modules are called."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    for stage in stages:
        if any(p.stage == stage.index for p in plan):
            continue
        key = f"stages.{stage.index} ({stage.compressor.name})"
        if is_block_stage(stage):
            raise RecipeError(f"{key}: its targets {stage.targets} match no block this method compresses in "
                              f"{len(layers)} decoder layers of model_type {model.config.model_type!r}")
        matched = [f"{adapter.layer_prefix(i)}.{n}" for i, layer in enumerate(layers)
                   for n in select_targets(layer, adapter.layer_prefix(i), stage.targets, [])]
        if matched:
            raise RecipeError(f"{key}: ignore {stage.ignore} excludes every module its targets {stage.targets} "
                              f"match ({len(matched)} modules, e.g. {matched[0]}): nothing would be compressed; "
                              f"fix stages.{stage.index}.ignore")
        examples = [f"{adapter.layer_prefix(0)}.{name}" for name, module in layers[0].named_modules()
                    if name and is_linear_like(module)][:SHOWN] if len(layers) else []
        raise RecipeError(f"{key}: targets {stage.targets} match no module of the decoder layers (the linear "
                          f"modules are named like {', '.join(examples)}); fix stages.{stage.index}.targets "
                          "(globs over full names, or 're:<regex>')")


def check_growth(recipe: Recipe, plan: list[PlannedModule]) -> None:
    """A shrinking method planned to make modules no smaller is refused unless its stage allows it."""
    for index, spec in enumerate(recipe.stages):
        grown = [p for p in plan if p.stage == index and p.grows]
        if not grown or spec.allow_growth:
            continue
        shown = "; ".join(f"{p.name} {p.out_features}×{p.in_features} rank {p.rank}: {p.params_before:,} → "
                          f"{p.params_after:,} parameters" for p in grown[:2])
        raise PlanRefused(
            f"stages.{index} ({spec.method}): {len(grown)} module(s) would not shrink, e.g. {shown}. A rank at or "
            "above m·n/(m+n) stores at least as much as the dense weight; lower the rank or raise the ratio, or set "
            f"stages.{index}.allow_growth: true to accept it", plan)
