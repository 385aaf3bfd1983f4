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

from .data.checks import check_recipe_data
from .errors import LrcompressError, RecipeError
from .eval.lm_eval_tasks import check_tasks
from .models import adapter_for
from .models.loading import model_skeleton, resolve_model_dir
from .pipeline import Stage
from .pipeline.blocks import is_block_stage
from .pipeline.costs import RunCosts, estimate, model_shape
from .pipeline.embedding import planned_embedding
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
              announce: Callable[[str], None] | None = None, model: nn.Module | None = None,
              sources: list[str] | None = None, calibration_given: bool = False) -> list[PlannedModule]:
    """Run every check that needs no weights; return the plan (computed on the meta skeleton, or on
    ``model`` when the caller holds one). ``sources`` receives one line per dataset and task saying where
    it will be read from; ``calibration_given``: the caller holds the calibration data (not checked)."""
    announce = announce or log.warning
    if not recipe.stages and recipe.budget is None and recipe.embedding is None:
        raise RecipeError("the recipe has no stages: nothing would be compressed. Add a stage (e.g. "
                          "stages: [{method: whiten, ratio: 0.2}]) or an embedding section, or use `lrcompress eval` "
                          "to evaluate a model as it is")
    lines = check_data(recipe, data_directory, calibration_given)
    if sources is not None:
        sources.extend(lines)
    skeleton = model if model is not None else model_skeleton(recipe.model.path, recipe.model.dtype,
                                                               recipe.model.trust_remote_code)
    if recipe.calibration.uses_chat_template and not calibration_given and model is None:
        check_chat_template(recipe)
    check_sequence_lengths(recipe, skeleton)
    plan = plan_modules(skeleton, stages)
    check_targets(stages, plan, skeleton)
    if recipe.runtime.batch_size > recipe.calibration.num_samples:
        announce(f"runtime.batch_size {recipe.runtime.batch_size} is larger than calibration.num_samples "
                 f"{recipe.calibration.num_samples}: every forward call holds all {recipe.calibration.num_samples} "
                 "windows (harmless; did you mean more samples?)")
    return plan


def plan_embedding(recipe: Recipe, model: nn.Module | None = None) -> list[PlannedModule]:
    """The plan rows of the recipe's ``embedding`` key (none without it), on the meta skeleton unless the
    caller holds the model."""
    if recipe.embedding is None:
        return []
    skeleton = model if model is not None else model_skeleton(recipe.model.path, recipe.model.dtype,
                                                               recipe.model.trust_remote_code)
    return planned_embedding(skeleton, adapter_for(skeleton), recipe.embedding)


def plan_costs(recipe: Recipe, plan: list[PlannedModule], model: nn.Module | None = None) -> RunCosts:
    """The run's predicted costs (``pipeline.costs``), from the config alone: a meta skeleton unless the
    caller holds the model."""
    from .core.devices import resolve_device

    skeleton = model if model is not None else model_skeleton(recipe.model.path, recipe.model.dtype,
                                                               recipe.model.trust_remote_code)
    return estimate(recipe, plan, model_shape(skeleton), resolve_device(recipe.runtime.device).type)


def check_data(recipe: Recipe, directory: Path | None, calibration_given: bool = False) -> list[str]:
    """Calibration and evaluation data and lm-eval tasks exist (``data.checks``); evaluation never reads
    the calibration text unless asked. Returns where each will be read from."""
    lines = check_recipe_data(recipe, directory, calibration_given)
    tasks = _check_tasks(recipe, directory)
    if calibration_given:
        return lines + tasks
    read = len(recipe.calibration.parts())          # every source of a mixture is guarded
    calibration = {_where(line) for line in lines[:read]}
    for i, spec in enumerate(recipe.eval.perplexity):
        where = _where(lines[read + i])
        if where in calibration and not recipe.eval.allow_calibration_split:
            raise RecipeError(f"eval.perplexity.{i} evaluates on the text calibration reads ({where}): the "
                              "perplexity would be optimistic. Evaluate on another split (e.g. wikitext2 test), or "
                              "set eval.allow_calibration_split: true if this is intended")
    return lines + tasks


def _check_tasks(recipe: Recipe, directory: Path | None) -> list[str]:
    """The recipe's lm-eval tasks, built once (``eval.lm_eval_tasks.check_tasks``): one line per task."""
    if recipe.eval.lm_eval is None:
        return []
    spec = recipe.eval.lm_eval
    try:
        checked = check_tasks(spec.tasks, directory, spec.include_path)
    except LrcompressError as error:
        raise LrcompressError(f"eval.lm_eval.tasks: {error}") from None
    return [f"lm-eval {task}: {where}" for task, where in checked.items()]


def check_chat_template(recipe: Recipe) -> None:
    """``calibration.chat_template`` needs a tokenizer that has one (read from the tokenizer files only).
    A tokenizer that cannot be read here is left to the model load, which says why."""
    from transformers import AutoTokenizer

    local = resolve_model_dir(recipe.model.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local else recipe.model.path,
                                                  trust_remote_code=recipe.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - reported by the model load with its own message
        return
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"calibration.chat_template is true but the tokenizer of {recipe.model.path} has no "
                          "chat template (a base model? set chat_template: false)")


def _where(line: str) -> str:
    """The location part of a ``check_recipe_data`` line ("calibration: /path" -> "/path")."""
    return line.split(": ", 1)[1]


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
        own = getattr(stage.compressor, "recipe_key", None)      # a byte budget's stage: its own section
        section = own or f"stages.{stage.index}"
        key = own or f"{section} ({stage.compressor.name})"
        if is_block_stage(stage):
            raise RecipeError(f"{key}: its targets {stage.targets} match no block this method compresses in "
                              f"{len(layers)} decoder layers of model_type {model.config.model_type!r}")
        matched = [f"{adapter.layer_prefix(i)}.{n}" for i, layer in enumerate(layers)
                   for n in select_targets(layer, adapter.layer_prefix(i), stage.targets, [])]
        if matched:
            raise RecipeError(f"{key}: ignore {stage.ignore} excludes every module its targets {stage.targets} "
                              f"match ({len(matched)} modules, e.g. {matched[0]}): nothing would be compressed; "
                              f"fix {section}.ignore")
        examples = [f"{adapter.layer_prefix(0)}.{name}" for name, module in layers[0].named_modules()
                    if name and is_linear_like(module)][:SHOWN] if len(layers) else []
        raise RecipeError(f"{key}: targets {stage.targets} match no module of the decoder layers (the linear "
                          f"modules are named like {', '.join(examples)}); fix {section}.targets "
                          "(globs over full names, or 're:<regex>')")


def check_growth(recipe: Recipe, plan: list[PlannedModule]) -> None:
    """A shrinking method planned to make modules no smaller is refused unless its stage allows it."""
    for index, spec in enumerate(recipe.stages):
        grown = [p for p in plan if p.stage == index and p.grows]
        if not grown or spec.allow_growth:
            continue
        requested = spec.options.get("rank")      # the plan's rank is capped at min(m, n): quote what was asked

        def rank(p: PlannedModule) -> str:
            capped = isinstance(requested, int) and p.rank is not None and requested > p.rank
            return f"rank {requested} (capped at {p.rank})" if capped else f"rank {p.rank}"

        shown = "; ".join(f"{p.name} {p.out_features}×{p.in_features} {rank(p)}: {p.params_before:,} → "
                          f"{p.params_after:,} parameters" for p in grown[:2])
        raise PlanRefused(
            f"stages.{index} ({spec.method}): {len(grown)} module(s) would not shrink, e.g. {shown}. A rank at or "
            "above m·n/(m+n) stores at least as much as the dense weight; lower the rank or raise the ratio, or set "
            f"stages.{index}.allow_growth: true to accept it", plan)
