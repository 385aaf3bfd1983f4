"""Resume: a run's fingerprint, and the decision to continue a staged run, start one, or refuse.

The fingerprint holds what decides the compressed tensors: the model files (``models.identity``, the
rule the baseline cache uses too), the recipe without the keys that cannot change
them (``output``, ``eval``, ``runtime.lazy``: lazy and default mode give identical tensors, so a run
killed for memory may be resumed in lazy mode; ``model.path``: the files identify the model), the
calibration windows' sha256 and the library versions.

A staging directory with the same fingerprint is always resumed, ``--overwrite`` or not (the result is
the uninterrupted run's). One that differs is refused, naming each field that differs, unless
``--overwrite`` (``output.overwrite: true``) is given: then it is discarded and the run starts over.

Under ``torchrun`` rank 0 alone creates, resumes or discards the staging directory and writes to it;
the other processes read what was finished before this run (to skip and replay it as rank 0 does)
and keep the segments compressed now in memory (identical to rank 0's: the same bytes were
broadcast). ``open_shared_staging`` is that whole decision, for the runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..checkpoint.staging import StagingDir, staging_path
from ..errors import CheckpointError
from ..models.identity import model_identity
from ..models.lazy import LayerStore
from .distributed import Collective
from .journal import StagedJournal
from .records import ModuleRecord

IGNORED_RECIPE_KEYS = ("output", "eval", "runtime.lazy", "model.path")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {"a.b.0.c": leaf}."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, child in items:
        flat.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return flat or {prefix: value}


def run_fingerprint(recipe_dump: dict[str, Any], model_source: str, windows_sha256: str,
                    versions: dict[str, str]) -> dict[str, Any]:
    recipe = {key: value for key, value in flatten(recipe_dump).items()
              if not any(key == ignored or key.startswith(ignored + ".") for ignored in IGNORED_RECIPE_KEYS)}
    return {"model": model_identity(model_source), "recipe": recipe,
            "calibration_windows_sha256": windows_sha256, "versions": versions}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per differing fingerprint field: its name, the staged value and the current one."""
    before, after = flatten(saved), flatten(now)
    missing = object()
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, missing), after.get(key, missing)
        if old != new:
            shown = ["(absent)" if v is missing else repr(v) for v in (old, new)]
            lines.append(f"{key}: {shown[0]} in the staged run, {shown[1]} now")
    return lines


def _changes_config(staging: StagingDir) -> list[int]:
    """Layers of finished segments whose stage changed the model config (e.g. merged experts)."""
    layers = []
    for segment in staging.finished():
        records = staging.segment_info(segment)["records"]
        if any(record["details"].get("config_updates") for record in records):
            layers += segment
    return layers


def open_staging(final: Path, fingerprint: dict[str, Any], overwrite: bool,
                 announce: Callable[[str], None]) -> StagingDir:
    """The staging directory of ``final``: resumed when its fingerprint matches, else created."""
    staging = StagingDir(staging_path(final))
    if not staging.path.exists():
        staging.create(fingerprint)
        return staging
    try:
        state = staging.read_state()
        problems = ["it has no state.json"] if state is None else differences(state["fingerprint"], fingerprint)
        if not problems and (changed := _changes_config(staging)):
            problems = [f"layers {changed} were compressed by a stage that changes the model config; resuming "
                        "such a run is not supported"]
    except CheckpointError as error:
        problems = [str(error)]
    if problems:
        if overwrite:
            announce(f"discarding {staging.path} (it cannot be resumed: {problems[0]})")
            staging.create(fingerprint)
            return staging
        raise CheckpointError(
            f"{staging.path} holds an interrupted run that this command cannot resume:\n  "
            + "\n  ".join(problems)
            + f"\nDelete {staging.path}, or pass --overwrite (output.overwrite: true), to start over.")
    if staging.is_written():
        announce(f"resuming from {staging.path}: the checkpoint is written, only the evaluation is left")
    else:
        announce(f"resuming from {staging.path}: {len(staging.finished())} segment(s) of layers already finished")
    return staging


def read_staging(final: Path) -> StagingDir | None:
    """The staging directory of ``final`` as rank 0 opened it, for reading only (None when this process
    cannot see it: then it has nothing to resume, which is right only when rank 0 has nothing either —
    resuming a torchrun job needs the output directory on a filesystem every process sees)."""
    staging = StagingDir(staging_path(final))
    return staging if staging.path.exists() else None


def open_shared_staging(final: Path, fingerprint: dict[str, Any], overwrite: bool, collective: Collective,
                        announce: Callable[[str], None]) -> StagingDir | None:
    """The staging directory of ``final`` every process sees: rank 0 opens it (resumes, creates or discards
    it) and writes to it, the other processes only read it (the engine's journal: ``StagedJournal``)."""
    staging = open_staging(final, fingerprint, overwrite, announce) if collective.is_writer else None
    collective.barrier()
    if not collective.is_writer:
        staging = read_staging(final)
    return staging


def restore_written(model: nn.Module, journal: StagedJournal, store: LayerStore) -> list[ModuleRecord]:
    """A staged run whose checkpoint is completely written (killed or failed during evaluation): put its
    compressed layers back into ``model`` and return its records, compressing and replaying nothing —
    only the evaluation is left to do. Lazy mode releases each segment again once restored."""
    records: list[ModuleRecord] = []
    for segment in sorted(journal.staging.finished()):
        journal.restore(model, segment)
        store.release(segment)
        records += journal.records(segment)
    return records
