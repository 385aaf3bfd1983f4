"""metrics.json, typed: compression accounting, evaluation results, timing, per-module records.

``RunMetrics`` is the one description of the file ``lrcompress run`` writes; the report, ``compare``,
``inspect``, the regression gate, the CLI and the bench scripts read it through ``RunMetrics.load`` (or,
for the gate, ``read_eval_section``, which also accepts a baseline cache entry and the output of
``lrcompress eval --output``). A section a run did not produce (no pre-pass, no dense baseline, no
lm-eval tasks) is absent from the file rather than null (``OMITTED_WHEN_NONE``).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Iterable

import torch
import transformers
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..checkpoint.layout import write_atomic
from ..core.version import __version__
from ..errors import LrcompressError
from ..eval.section import BaselineCacheInfo, EvalSection, Section
from ..modules import compressed_modules
from ..pipeline.allocation import AllocationResult
from ..pipeline.records import ModuleRecord
from ..pipeline.reference import OutputMatchingReport


class CompressionSummary(Section):
    """Ratios are fractions *removed*; ``accounting`` says what a parameter and a byte are."""

    targeted_modules: int
    targeted_params_before: int
    targeted_params_after: int
    targeted_ratio: float
    model_params_before: int
    model_params_after: int
    model_ratio: float
    bytes: int | None                    # every tensor written (None when the run saved nothing)
    dense_bytes: int
    targeted_bytes_before: int | None
    targeted_bytes_after: int | None
    targeted_bytes_ratio: float | None
    model_bytes_before: int | None = None    # the whole model's weights in memory (bytes are the primary size)
    model_bytes_after: int | None = None
    model_bytes_ratio: float | None = None
    accounting: str


class MemoryReport(Section):
    compress: dict[str, Any]             # pipeline.memory.PeakMemory.report()
    process_peak_rss_bytes: int | None
    lazy: bool


class CalibrationSourceRecord(Section):
    """One source of the calibration set (``data.mixture.SourceWindows``)."""

    description: str
    text_sha256: str
    tokens: int                   # tokens in the source's text, the windows' pool
    num_samples: int
    windows_sha256: str


class CalibrationProvenance(Section):
    source: str
    text_sha256: str
    windows_sha256: str
    num_samples: int
    seq_len: int
    seed: int
    sources: list[CalibrationSourceRecord] | None = None     # per source, in order (absent: given in memory)
    OMITTED_WHEN_NONE = ("sources",)


class Provenance(Section):
    """Also written into the checkpoint's config.json (``lrcompress.provenance``)."""

    versions: dict[str, str]
    seed: int
    recipe_fingerprint: str
    model_source: str
    calibration: CalibrationProvenance
    processes: int | None = None         # only for a run spread over several processes
    OMITTED_WHEN_NONE = ("processes",)


class RunMetrics(Section):
    """Everything ``lrcompress run`` measured, as metrics.json holds it."""

    eval: EvalSection = Field(default_factory=EvalSection)
    prepass: dict[str, dict[str, Any]] | None = None      # pre-pass kind → its report (e.g. Fisher)
    memory: MemoryReport | None = None
    provenance: Provenance | None = None
    compression: CompressionSummary | None = None
    timing: dict[str, float] = Field(default_factory=dict)
    modules: list[ModuleRecord] = Field(default_factory=list)
    allocation: AllocationResult | None = None             # a stage with a budget allocation: the ranks chosen
    output_matching: OutputMatchingReport | None = None    # runtime.target: original: what it cost
    refine: dict[str, Any] | None = None                    # runtime.refine: pipeline.refine.refine_summary
    distill: dict[str, Any] | None = None                   # runtime.distill: pipeline.distill_stage
    OMITTED_WHEN_NONE = ("prepass", "memory", "provenance", "compression", "allocation", "output_matching", "refine",
                         "distill")

    def save(self, path: Path) -> None:
        write_json(path, self.dump())

    @classmethod
    def load(cls, path: Path) -> "RunMetrics":
        """Read a metrics.json; one message naming the file when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise MetricsError(f"{path}: no such file")
        try:
            return cls.model_validate_json(path.read_text())
        except (ValidationError, UnicodeDecodeError) as error:
            raise MetricsError(f"{path}: not a metrics.json of lrcompress run ({_first_problem(error)})") from None


class MetricsError(LrcompressError):
    """A metrics file that cannot be read (exit code 2)."""


def _first_problem(error: Exception) -> str:
    if isinstance(error, ValidationError):
        problems = error.errors()
        where = ".".join(str(p) for p in problems[0]["loc"])
        return f"{where}: {problems[0]['msg']}" if where else problems[0]["msg"]
    return str(error)


class _EvalDocument(BaseModel):
    """Any file with an ``eval`` section: a metrics.json, a baseline cache entry, ``eval --output``."""

    model_config = ConfigDict(extra="ignore")
    eval: EvalSection


def read_eval_section(path: Path) -> EvalSection:
    """The ``eval`` section of a metrics.json, a baseline cache entry or an ``eval --output`` file."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: no such file")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MetricsError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("eval"), dict):
        raise MetricsError(f"{path}: no 'eval' section (expected a metrics.json or a baseline file)")
    try:
        return _EvalDocument.model_validate(document).eval
    except ValidationError as error:
        raise MetricsError(f"{path}: {_first_problem(error)}") from None


class EvalReport(Section):
    """What ``lrcompress eval --output`` writes (``lrcompress check --baseline`` reads its ``eval``)."""

    eval: EvalSection
    model_source: str
    baseline_cache: BaselineCacheInfo | None = None

    def save(self, path: Path) -> None:
        write_json(path, self.dump())


def unique_param_count(model: nn.Module) -> int:
    """Stored values counted once even when tied (embeddings shared with the LM head); a compressed
    module counts its ``stored_params()`` (quantization codes live in buffers, not parameters)."""
    compressed = compressed_modules(model)
    inside = {id(p) for _, module in compressed for p in module.parameters()}
    total = sum(module.stored_params() for _, module in compressed)
    seen: set[int] = set()
    for parameter in model.parameters():  # .parameters() already yields shared tensors once
        if id(parameter) not in seen and id(parameter) not in inside:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


ACCOUNTING = ("params = stored weight values (low-rank r·(m+n), sparse kept values, quantized one "
              "code per weight; sparse dictionaries d_in·k (a shared one split among its group) + s·d_out "
              "values + indices at their byte size in units of one value; + bias); bytes = every tensor written, "
              "scales/zeros/masks/indices included; bytes are the primary size (quantization keeps every weight as a "
              "code, so its parameter count does not shrink); ratios are fractions removed")


def compression_summary(records: Iterable[ModuleRecord], model_params_before: int, model_params_after: int,
                        bytes_on_disk: int | None, bytes_per_param: int) -> CompressionSummary:
    """Ratios are fractions *removed*. A module compressed by several stages counts once: its first
    stage's "before" and its last stage's "after"."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    bytes_before: dict[str, int | None] = {}
    bytes_after: dict[str, int | None] = {}
    for record in records:
        before.setdefault(record.name, record.params_before)
        after[record.name] = record.params_after
        bytes_before.setdefault(record.name, record.bytes_before)
        bytes_after[record.name] = record.bytes_after
    targeted_before, targeted_after = sum(before.values()), sum(after.values())
    byte_counts = None
    if all(v is not None for v in [*bytes_before.values(), *bytes_after.values()]):
        byte_counts = (sum(bytes_before.values()), sum(bytes_after.values()))  # type: ignore[arg-type]
    dense_bytes = model_params_before * bytes_per_param
    return CompressionSummary(
        targeted_modules=len(before),
        targeted_params_before=targeted_before,
        targeted_params_after=targeted_after,
        targeted_ratio=1 - targeted_after / targeted_before if targeted_before else 0.0,
        model_params_before=model_params_before,
        model_params_after=model_params_after,
        model_ratio=1 - model_params_after / model_params_before if model_params_before else 0.0,
        bytes=bytes_on_disk,
        dense_bytes=dense_bytes,
        targeted_bytes_before=byte_counts[0] if byte_counts else None,
        targeted_bytes_after=byte_counts[1] if byte_counts else None,
        targeted_bytes_ratio=1 - byte_counts[1] / byte_counts[0] if byte_counts and byte_counts[0] else None,
        # the whole model's weights in memory: dense size, with the targeted modules' bytes swapped
        model_bytes_before=dense_bytes,
        model_bytes_after=dense_bytes - byte_counts[0] + byte_counts[1] if byte_counts else None,
        model_bytes_ratio=(byte_counts[0] - byte_counts[1]) / dense_bytes if byte_counts and dense_bytes else None,
        accounting=ACCOUNTING,
    )


def versions() -> dict[str, str]:
    return {"lrcompress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write_json(path: Path, document: dict[str, Any]) -> None:
    """A metrics document, written atomically (values JSON cannot hold are written as text)."""
    write_atomic(path, json.dumps(document, indent=2, default=str))


def format_bytes(count: int | float | None) -> str:
    """1.5 GiB, 432.0 MiB, 12.3 KiB, 512 B."""
    if count is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def describe_change(before: int, after: int, unit: str) -> str:
    """"a → b (x% removed)", or "(+x% …)" when it grew: never a negative "removed"."""
    text = f"{before:,} → {after:,}" if unit == "params" else f"{format_bytes(before)} → {format_bytes(after)}"
    if not before:
        return text
    change = 1 - after / before
    return text + (f" ({100 * change:.1f}% removed)" if change >= 0 else f" (+{-100 * change:.1f}%)")
