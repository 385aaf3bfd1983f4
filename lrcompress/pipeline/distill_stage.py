"""``runtime.distill`` in a run: the teacher states before the walk, the distillation after it, the journal.

Order in ``RecipeRun``: the original model's last decoder layer outputs on the calibration windows are kept
before the layer walk (``pipeline.distill.teacher_states``: one forward of the model as the walk receives it);
the walk compresses every layer; then ``pipeline.distill.distill_model`` trains the factors and the staged
segments are written again with the distilled tensors, so the checkpoint holds them.

Resume (the staging directory, ``<out>.partial``): the distilled factors are first written whole to
``distill.safetensors`` and the report to ``distill.json`` (``committed: false``); then every segment is
written again; then ``distill.json`` says ``committed: true`` and ``distill.safetensors`` goes. A run killed
before ``distill.json`` exists distils again from the walk's (undistilled) segments, with the same seed: the
same result. One killed while the segments were being rewritten assigns ``distill.safetensors`` and rewrites
them; one killed after reads the report and trains nothing. ``distill.json`` stays in the checkpoint beside
metrics.json.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint.layout import disk_errors, replace_durably, write_durable
from ..checkpoint.shards import read_all
from ..data.mixture import calibration_set
from ..errors import LrcompressError
from ..models import ArchitectureAdapter
from .distill import DistillConfig, distill_model, split_windows, teacher_states
from .journal import SegmentJournal, StagedJournal
from .memory import PeakMemory
from .refine import trainable_parameters

if TYPE_CHECKING:
    from ..recipe import CalibrationSpec, DistillSpec, RuntimeSpec

log = logging.getLogger(__name__)
REPORT_NAME, TENSORS_NAME = "distill.json", "distill.safetensors"


class DistillStage:
    """One run's distillation: ``capture`` before the walk, ``finish`` after it (both skip what a resumed run
    finds done in the staging directory)."""

    def __init__(self, config: DistillConfig, adapter: ArchitectureAdapter, journal: SegmentJournal | None,
                 device: torch.device, world_size: int = 1) -> None:
        if world_size > 1:
            raise LrcompressError(f"runtime.distill runs in one process; this run has {world_size} (its gradients "
                                  "would have to be all-reduced across them): run it without --nproc")
        self.config, self.adapter, self.journal, self.device = config, adapter, journal, device
        self.teacher: torch.Tensor | None = None
        self.teacher_seconds = 0.0

    @property
    def _staging(self):
        return self.journal.staging if isinstance(self.journal, StagedJournal) else None

    def saved(self) -> dict[str, Any] | None:
        """The report a previous run of this staging directory wrote (None when it has not distilled)."""
        staging = self._staging
        path = staging.path / REPORT_NAME if staging is not None else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    def capture(self, model: nn.Module, windows: torch.Tensor, batch: int) -> None:
        """The teacher states, from the model as it is now (before the walk); nothing when already distilled."""
        if self.saved() is not None:
            return
        started = time.perf_counter()
        with _on(model, self.device):
            self.teacher = teacher_states(model, self.adapter, windows, batch, self.device)
        self.teacher_seconds = time.perf_counter() - started
        log.info("runtime.distill: teacher states of %d windows kept (%.1f MiB, %.1fs)", len(windows),
                 self.teacher.numel() * 4 / 2**20, self.teacher_seconds)

    def finish(self, model: nn.Module, windows: torch.Tensor) -> dict[str, Any]:
        """Distil (or take a resumed run's result), write the segments again; metrics.json's ``distill``."""
        saved = self.saved()
        if saved is None:
            if self.teacher is None:
                raise RuntimeError("DistillStage.finish before capture")
            config = self.config
            with _on(model, self.device), PeakMemory(self.device) as peak:
                report = distill_model(model, self.adapter, windows, self.teacher, config)
            self.teacher = None
            saved = {**report.model_dump(), "teacher_seconds": self.teacher_seconds,
                     "peak_memory_bytes": peak.report()["peak_memory_bytes"], "config": config.model_dump(),
                     "committed": False}
            self._write(model, saved)
        elif not saved["committed"]:
            self._assign(model)
        if not saved["committed"]:
            self._commit(model, saved)
        return {key: value for key, value in saved.items() if key != "committed"}

    def _write(self, model: nn.Module, saved: dict[str, Any]) -> None:
        """The distilled factors and the report into the staging directory, before any segment is rewritten."""
        staging = self._staging
        if staging is None:
            return
        tensors = {name: p.detach().contiguous() for name, p in _trained(model, self.adapter)}
        with disk_errors(f"writing the distilled factors into {staging.path}", staging.path):
            tmp = staging.path / f"{TENSORS_NAME}.tmp"
            save_file(tensors, tmp, metadata={"format": "pt"})
            replace_durably(tmp, staging.path / TENSORS_NAME)
            write_durable(staging.path / REPORT_NAME, json.dumps(saved, indent=2))

    def _assign(self, model: nn.Module) -> None:
        """A run killed while rewriting the segments: the distilled factors it wrote, back into the model."""
        tensors = read_all(self._staging.path / TENSORS_NAME)
        with torch.no_grad():
            for name, parameter in _trained(model, self.adapter):
                parameter.copy_(tensors[name])

    def _commit(self, model: nn.Module, saved: dict[str, Any]) -> None:
        staging = self._staging
        if staging is None:
            return
        for segment in staging.finished():
            self.journal.commit(model, segment, self.journal.records(segment))
        with disk_errors(f"writing {REPORT_NAME} into {staging.path}", staging.path):
            write_durable(staging.path / REPORT_NAME, json.dumps({**saved, "committed": True}, indent=2))
            (staging.path / TENSORS_NAME).unlink(missing_ok=True)
        saved["committed"] = True


def distill_windows(calibration: "CalibrationSpec", scale: int, tokenizer: Any, directory: Path | None,
                    windows: torch.Tensor) -> torch.Tensor:
    """The windows to distil on: the calibration's own (``windows``) at scale 1, else every source's
    ``num_samples`` × ``scale`` windows drawn from the same text with the same seeds (``calibration_set``)."""
    if scale == 1:
        return windows
    data = calibration.model_dump()
    if calibration.sources is not None:
        data["sources"] = [{**source, "num_samples": source["num_samples"] * scale} for source in data["sources"]]
        data.pop("num_samples", None)
    else:
        data["num_samples"] = calibration.num_samples * scale
    return calibration_set(type(calibration).model_validate(data), tokenizer, directory).windows


def _trained(model: nn.Module, adapter: ArchitectureAdapter) -> list[tuple[str, nn.Parameter]]:
    """(full name, parameter) of what the distillation trains, in a fixed order."""
    chosen = {id(p) for p in trainable_parameters(adapter.decoder_layers(model), ["factors"])}
    return [(name, p) for name, p in model.named_parameters() if id(p) in chosen]


class _on:
    """The whole model on ``device`` inside (a no-op on the CPU), back where it was after."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, torch.device(device)

    def __enter__(self) -> None:
        self.home = next(self.model.parameters()).device
        if self.home != self.device:
            self.model.to(self.device)

    def __exit__(self, *exc: object) -> None:
        if self.home != self.device:
            self.model.to(self.home)


def _objective(spec: DistillSpec) -> str:
    """The trained divergence in words, for the dry run."""
    if spec.divergence == "mixed":
        return f"{1 - spec.reverse_share:g}·forward + {spec.reverse_share:g}·reverse KL"
    return f"{spec.divergence} KL"


def describe_distill(runtime: "RuntimeSpec", num_samples: int, seed: int) -> list[str]:
    """The dry run's line for ``runtime.distill`` (none when it is off)."""
    spec = runtime.distill
    if spec is None:
        return []
    train, held = split_windows(max(num_samples * spec.windows_scale, 2), spec.held_out)
    steps = -(-len(train) // spec.batch_size)
    return [f"runtime.distill: after the walk, every float factor (low-rank pairs, dictionaries and their values) trained toward the original model's next-token "
            f"distributions ({_objective(spec)}, teacher = its last layer's outputs kept before the walk): AdamW lr {spec.lr:g}, "
            f"{spec.warmup:g} warm-up then cosine, {spec.epochs} epoch(s) × {steps} steps of {spec.batch_size} "
            f"windows, {len(held)} window(s) held out{' (best state kept)' if spec.revert_if_worse else ''}, "
            f"T={spec.temperature:g}, seed {seed}"]
