"""Zero-shot tasks through lm-eval: ``HFLM(pretrained=<model object>)`` + ``simple_evaluate``, the HFLM
running a context shared by several choices once (``eval.shared_context``).

The four tasks lrcompress ships (arc_easy, arc_challenge, piqa, lambada_openai) run from task YAMLs in
``lrcompress/eval/tasks`` that read the local release files under the data directory; any other name is
looked up in the user's task directories (``eval.lm_eval.include_path`` / ``--include-path``: lm-eval
task YAMLs, which take precedence) and then in lm-eval's own task registry (whose data usually comes
from the hub). lm-eval is imported only here, and only when a task runs: importing lrcompress stays fast.

A task that cannot be built (unknown name, unreachable hub, broken YAML) is a one-line
``LrcompressError``; ``check_tasks`` builds the tasks once before any compression so that this happens
in seconds, not after the run (lm-eval's datasets are cached, so the second build costs little).

Results keep lm-eval's metric names with their stderr. lm-eval's perplexities (LAMBADA's target-word
perplexity) are labeled as such and live under ``eval.lm_eval``, apart from lrcompress's token-level
perplexity under ``eval.perplexity``: the two protocols are never compared with each other.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LrcompressError
from .task_data import TASK_DATA, local_files

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = {name: f"lrc_{name}" for name in TASK_DATA}   # user-facing name -> shipped YAML task
ACCURACY = "fraction of documents whose gold answer has the highest log-likelihood"
PROTOCOLS = {
    "acc": f"lm-eval acc: {ACCURACY}",
    "acc_norm": f"lm-eval acc_norm: {ACCURACY} after dividing by the answer's length in characters",
    "perplexity": "lm-eval target-word perplexity: exp(-mean log p(final word | passage)) over passages "
                  "(not token-level perplexity)",
    "word_perplexity": "lm-eval word perplexity: exp(total NLL / words) over whole documents",
    "byte_perplexity": "lm-eval byte perplexity: exp(total NLL / UTF-8 bytes) over whole documents",
    "bits_per_byte": "lm-eval bits per byte: total NLL / (bytes · ln 2)",
}
TASK_PROTOCOLS = {  # where a metric means something else for one task
    "lambada_openai": {"acc": "lm-eval acc: fraction of passages whose final word is the greedy continuation"},
}
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def parse_tasks(value: str | list[str]) -> list[str]:
    """``"arc_easy,piqa"`` or a list -> names, in order, without duplicates."""
    names = value.split(",") if isinstance(value, str) else list(value)
    cleaned = [n.strip() for n in names if n and n.strip()]
    if not cleaned:
        raise LrcompressError("no lm-eval task named (e.g. --tasks arc_easy,piqa)")
    return list(dict.fromkeys(cleaned))


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" for an undefined stderr (one document, say)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def task_result(task: str, raw: dict[str, Any], samples: int | None) -> dict[str, Any]:
    """One task's entry of ``simple_evaluate(...)["results"]`` -> {metric, metric_stderr, protocols}."""
    labels = {**PROTOCOLS, **TASK_PROTOCOLS.get(task, {})}
    result: dict[str, Any] = {}
    protocols: dict[str, str] = {}
    for key, value in raw.items():
        if "," not in key:
            continue  # "alias", "name", ...
        metric, _filter = key.split(",", 1)
        if metric.endswith("_stderr"):
            result[metric] = _number(value)
            continue
        result[metric] = _number(value)
        protocols[metric] = labels.get(metric, f"lm-eval {metric}")
    result["samples"] = samples
    result["protocols"] = protocols
    return result


def document_metrics(samples: list[dict[str, Any]]) -> dict[str, list[float]]:
    """lm-eval's logged samples of one task -> {metric: [0 or 1 per document, by document id]}, for the
    metrics that score each document right or wrong (acc, acc_norm); a corpus-level metric's per-document
    inputs (lambada's log-likelihoods behind its perplexity) are not per-document scores and are left out."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    names = [m for m in (ordered[0].get("metrics", []) if ordered else [])
             if all(s.get(m) in (0, 1) for s in ordered)]
    return {m: [float(s[m]) for s in ordered] for m in names}


def describe_source(task: str, directory: Path | None, include_path: list[str] | None = None) -> str:
    if task not in LOCAL_TASKS:
        return ("lm-eval task (" + ", ".join(include_path) + " or lm-eval's registry)") if include_path \
            else "lm-eval's own task definition (hub data)"
    if directory is None:
        hub_id, config, _ = TASK_DATA[task].hub
        return f"hub {hub_id}" + (f"/{config}" if config else "")
    return ", ".join(str(p) for p in local_files(task, directory))


class _CustomDatasetHint(logging.Filter):
    """lm-eval warns on every task with a ``custom_dataset`` hook that kwargs can go to ``--metadata``:
    advice for its own CLI, noise for lrcompress users. Drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(tasks: list[str], directory: Path | None, include_path: list[str] | None = None):
    """lm-eval's TaskManager over the shipped YAMLs and the user's directories, and lm-eval's own
    registry only when a task is found in neither (indexing its ~15k YAMLs takes tens of seconds)."""
    for folder in include_path or []:
        if not Path(folder).expanduser().is_dir():
            raise LrcompressError(f"lm-eval include_path {folder!r} is not a directory")
    paths = (str(TASKS_DIR),) + tuple(str(Path(folder).expanduser().resolve()) for folder in include_path or [])
    data = str(directory) if directory else None
    manager = _manager(paths, False, data)
    if all(LOCAL_TASKS.get(t, t) in manager.all_tasks for t in tasks):
        return manager
    return _manager(paths, True, data)


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], include_defaults: bool, data_directory: str | None):
    """One index per process and setting: the pre-compression check and the evaluation share it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults,
                       metadata={"lrcompress_data_dir": data_directory})


def _check_known(manager, names: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        hints = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
        raise LrcompressError("lm-eval does not know task " + ", ".join(
            f"{name!r}" + (f" (did you mean {hints[name][0]!r}?)" if hints[name] else "") for name in unknown)
            + f"; shipped tasks: {', '.join(LOCAL_TASKS)}; add your own task YAMLs with --include-path")


def _build_tasks(manager, names: list[str]) -> None:
    """Build the tasks (their data included); unknown or unreachable -> one line naming the task."""
    _check_known(manager, names)
    for name in names:
        try:
            manager.load([name])
        except LrcompressError:
            raise
        except Exception as error:  # the hub unreachable (ConnectionError), a bad YAML, a missing file
            lines = str(error).strip().splitlines()
            raise LrcompressError(f"lm-eval task {name!r} could not be loaded: {type(error).__name__}: "
                                  f"{lines[0] if lines else ''}") from None


def check_tasks(tasks: list[str], data_directory: str | Path | None = None,
                include_path: list[str] | None = None) -> dict[str, str]:
    """Build every task once (before any compression): task -> where its documents come from."""
    directory = Path(data_directory) if data_directory is not None else None
    sources = {task: describe_source(task, directory, include_path) for task in tasks}
    with _quiet_lm_eval():
        _build_tasks(task_manager(tasks, directory, include_path), [LOCAL_TASKS.get(t, t) for t in tasks])
    return sources


@contextlib.contextmanager
def _quiet_lm_eval():
    task_logger, hint = logging.getLogger("lm_eval.api.task"), _CustomDatasetHint()
    task_logger.addFilter(hint)
    try:
        yield
    finally:
        task_logger.removeFilter(hint)


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                   num_fewshot: int | None = None, data_directory: str | Path | None = None,
                   device: torch.device | str = "cpu", bootstrap_iters: int = 1000,
                   include_path: list[str] | None = None, per_document: bool = False) -> dict[str, dict[str, Any]]:
    """Run lm-eval on ``model`` (any nn.Module with a HF causal-LM interface, compressed or not).

    ``per_document``: each task's entry also holds ``per_document`` = {metric: its value on every document,
    in document order} (see ``document_metrics``): two models scored on the same documents can then be
    compared pairwise, whose standard error is far smaller than either accuracy's when they mostly agree."""
    directory = Path(data_directory) if data_directory is not None else None
    sources = {task: describe_source(task, directory, include_path) for task in tasks}  # early: missing files
    started = time.perf_counter()
    from lm_eval import simple_evaluate

    from .shared_context import SharedContextLM     # imports lm-eval: only here, when a task runs

    lm_names = {task: LOCAL_TASKS.get(task, task) for task in tasks}
    manager = task_manager(tasks, directory, include_path)
    _check_known(manager, list(lm_names.values()))
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    try:
        lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        with _quiet_lm_eval():
            output = simple_evaluate(model=lm, tasks=list(lm_names.values()), num_fewshot=num_fewshot, limit=limit,
                                     task_manager=manager, log_samples=per_document,
                                     bootstrap_iters=bootstrap_iters)
    except (ConnectionError, OSError) as error:  # data that went away between the check and the run
        raise LrcompressError(f"lm-eval could not load its data: {type(error).__name__}: "
                              f"{(str(error).strip().splitlines() or [''])[0]}") from None
    finally:
        model.to(home)
    if output is None:
        raise LrcompressError("lm-eval returned no results")
    seconds = time.perf_counter() - started
    results: dict[str, dict[str, Any]] = {}
    for task, lm_name in lm_names.items():
        if lm_name not in output["results"]:
            raise LrcompressError(f"lm-eval produced no result for task {task} ({lm_name})")
        counts = output.get("n-samples", {}).get(lm_name, {})
        entry = task_result(task, output["results"][lm_name], counts.get("effective"))
        entry.update(source=sources[task], limit=limit, num_fewshot=num_fewshot or 0, lm_eval_task=lm_name)
        if per_document:
            entry["per_document"] = document_metrics(output.get("samples", {}).get(lm_name, []))
        results[task] = entry
    log.info("lm-eval: %d task(s) in %.1f s", len(tasks), seconds)
    return results
