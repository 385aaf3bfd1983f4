"""The staging directory of a run, ``<out>.partial``: finished segments of layers, durably, until the
checkpoint is complete and renamed to ``<out>``.

    state.json                        format, the run's fingerprint, the finished segments (written last)
    layers-00000-00001.safetensors    the (compressed) layers of one segment, shared tensors stored once
    layers-00000-00001.json           their module specs, aliases and module records

A segment's files are flushed to disk before state.json names it, and every file is replaced
atomically, so after a crash at any point (kill -9, preemption) state.json lists only segments whose
files are complete; a segment it does not list is simply computed and written again. ``complete`` adds
the tensors outside the layers, the shard index, config.json and the tokenizer and marks the state
``written``: a rerun then skips the compression and only evaluates. The runner writes metrics.json
and the report into it; ``publish`` then renames it to ``<out>`` (a run is complete when its metrics
are: a complete-looking checkpoint never exists before them) and drops the journal files. Every write goes
through ``disk_errors``: a full disk or a read-only filesystem is one message that says the staged run
resumes.

A run that fails keeps its staging directory only when it holds finished work (a segment, or the written
checkpoint): that is what a rerun resumes. One holding only state.json is removed as the run ends
(``discard_if_unfinished``, called by ``checkpoint.lock.claim_output_dir``); a rerun recreates it, so
nothing is lost, and a run that can never succeed leaves nothing behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .carry import write_carried_files
from .shards import read_all
from .layout import CONFIG_NAME, disk_errors, replace_durably, swap_into_place, write_durable
from .writer import checkpoint_config, write_index

STATE_NAME = "state.json"
STATE_FORMAT = 2            # 2: "segments" (format 1 called them "blocks")
OUTER_NAME = "model-outer.safetensors"


def staging_path(final: Path) -> Path:
    """Deterministic, so that the same command finds the run it was interrupted in."""
    return final.with_name(final.name + ".partial")


def _stem(layers: list[int]) -> str:
    return f"layers-{layers[0]:05d}-{layers[-1]:05d}"


def _nbytes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}


def discard_if_unfinished(path: Path) -> bool:
    """Remove the staging directory ``path`` of a failed run when it holds no finished segment: a rerun
    would start from nothing either way, and a run that can never succeed (a NaN in the model) would
    otherwise leave a ``.partial`` holding only state.json. One that holds a finished segment (or a
    written checkpoint) is kept: the same command resumes it. One whose state cannot be read is left
    alone (the next run names the problem). Returns whether it was removed."""
    staging = StagingDir(path)
    try:
        state = staging.read_state() if staging.path.is_dir() else None
    except CheckpointError:
        return False
    if state is None or state["segments"] or state.get("written"):   # no state.json: not ours to remove
        return False
    shutil.rmtree(staging.path, ignore_errors=True)
    return True


class StagingDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def state_file(self) -> Path:
        return self.path / STATE_NAME

    def read_state(self) -> dict[str, Any] | None:
        """The state, or None when there is no state.json; raises on an unreadable one."""
        if not self.state_file.is_file():
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{self.state_file} is unreadable: {error}") from None
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{self.state_file}: state format {state.get('format')!r}, expected {STATE_FORMAT}")
        return state

    def create(self, fingerprint: dict[str, Any]) -> None:
        """Start empty (removing whatever was there: the caller decided it may go)."""
        shutil.rmtree(self.path, ignore_errors=True)
        with disk_errors(f"creating {self.path}"):
            self.path.mkdir(parents=True)
        self._write_state({"format": STATE_FORMAT, "fingerprint": fingerprint, "segments": []})

    def _write_state(self, state: dict[str, Any]) -> None:
        with disk_errors(f"writing {self.state_file}", self.path):
            write_durable(self.state_file, json.dumps(state, indent=2, sort_keys=True))

    def is_written(self) -> bool:
        """Every tensor, config.json and the tokenizer are written: only evaluation is left."""
        state = self.read_state()
        return bool(state and state.get("written"))

    def finished(self) -> list[list[int]]:
        state = self.read_state()
        return [] if state is None else [list(segment) for segment in state["segments"]]

    def write_segment(self, layers: list[int], tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Write a finished segment's tensors and info, flush them, then record it in state.json."""
        stem = _stem(layers)
        tmp = self.path / f"{stem}.safetensors.tmp"
        with disk_errors(f"writing layers {layers} to {self.path}", self.path):
            save_file(tensors, tmp, metadata={"format": "pt"})
            replace_durably(tmp, self.path / f"{stem}.safetensors")
            write_durable(self.path / f"{stem}.json", json.dumps({**info, "layers": layers,
                                                                  "tensors": _nbytes(tensors)}, indent=2, sort_keys=True))
        state = self.read_state()
        if state is None:
            raise CheckpointError(f"{self.state_file} disappeared while the run was writing into {self.path}")
        state["segments"] = [segment for segment in state["segments"] if segment != layers] + [layers]
        self._write_state(state)

    def segment_info(self, layers: list[int]) -> dict[str, Any]:
        path = self.path / f"{_stem(layers)}.json"
        if not path.is_file():
            raise CheckpointError(f"{self.state_file} lists layers {layers} but {path} is missing")
        return json.loads(path.read_text())

    def read_segment(self, layers: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.path / f"{_stem(layers)}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{self.state_file} lists layers {layers} but {path} is missing")
        return read_all(path), self.segment_info(layers)

    def complete(self, outer: dict[str, torch.Tensor], outer_aliases: dict[str, str], model_config: Any,
                 dtype: torch.dtype, provenance: dict[str, Any], tokenizer: Any, extra_files: dict[str, str],
                 source: str | Path | None = None, outer_specs: dict[str, dict[str, Any]] | None = None) -> None:
        """Write everything but the metrics: the tensors outside the layers, the index, config.json, the
        generation config and tokenizer files of ``source`` (copied unchanged) and ``extra_files``; then
        mark the state ``written`` (last, durably). ``outer_specs``: the compressed modules outside the
        layers (a quantized embedding and LM head)."""
        segments = [self.segment_info(layers) for layers in self.finished()]
        with disk_errors(f"writing the checkpoint into {self.path}", self.path):
            tmp = self.path / f"{OUTER_NAME}.tmp"
            save_file(outer, tmp, metadata={"format": "pt"})
            replace_durably(tmp, self.path / OUTER_NAME)
            weight_map = {name: OUTER_NAME for name in outer}
            sizes = _nbytes(outer)
            specs, aliases = dict(outer_specs or {}), dict(outer_aliases)
            for info in segments:
                file = f"{_stem(info['layers'])}.safetensors"
                weight_map.update({name: file for name in info["tensors"]})
                sizes.update(info["tensors"])
                specs.update(info["specs"])
                aliases.update(info["aliases"])
            write_index(self.path, weight_map, sum(sizes.values()))
            config = checkpoint_config(model_config, dtype, specs, aliases, provenance)
            write_durable(self.path / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
            write_carried_files(self.path, source, tokenizer)
            for name, text in extra_files.items():
                write_durable(self.path / name, text)
            for leftover in self.path.glob("*.tmp"):  # a write a crash interrupted, since redone
                leftover.unlink()
        state = self.read_state()
        if state is None:
            raise CheckpointError(f"{self.state_file} disappeared while the run was writing into {self.path}")
        self._write_state({**state, "written": True})

    def publish(self, final: Path) -> None:
        """Rename the directory (complete, metrics.json written into it) to ``final``, replacing one the
        caller may overwrite, then drop the journal files."""
        segments = self.finished()
        with disk_errors(f"renaming {self.path} to {final}", self.path):
            swap_into_place(self.path, final)
        for layers in segments:
            (final / f"{_stem(layers)}.json").unlink()
        (final / STATE_NAME).unlink()
