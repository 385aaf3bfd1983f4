"""``lrcompress inspect``: what a checkpoint holds, module by module, joined with its run's metrics.json.

The checkpoint's own metadata gives each compressed module's kind, shape and rank; the run's records
(when metrics.json sits beside the weights) add the parameters kept, the relative output error and the
numerical path. The CLI only renders the result.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import bytes_on_disk, read_metadata
from ..checkpoint.reader import verify_compressed
from ..modules import spec_shape
from ..pipeline.allocation import AllocationResult
from ..pipeline.records import ModuleRecord
from .metrics import RunMetrics


@dataclass
class InspectedModule:
    name: str
    kind: str
    shape: str                         # "out×in"
    rank: int | None
    record: ModuleRecord | None        # the run's record of its last stage (None without metrics.json)


@dataclass
class Inspection:
    checkpoint: Path
    weight_bytes: int
    modules: list[InspectedModule] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    allocation: AllocationResult | None = None   # the ranks a budget allocation chose (from metrics.json)


def natural_key(name: str) -> list[Any]:
    """``model.layers.2.x`` before ``model.layers.10.x``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def inspect_checkpoint(checkpoint: Path) -> Inspection:
    """Raises ``CheckpointError`` when ``checkpoint`` is not an lrcompress checkpoint, or not one that
    ``load`` would accept (an incomplete file, a tensor whose shape disagrees with the config)."""
    checkpoint = Path(checkpoint)
    _, meta = read_metadata(checkpoint)
    verify_compressed(checkpoint)
    metrics_path = checkpoint / "metrics.json"
    metrics = RunMetrics.load(metrics_path) if metrics_path.is_file() else RunMetrics()
    records = {m.name: m for m in metrics.modules}
    modules = [InspectedModule(name, spec["kind"], spec_shape(spec), spec.get("rank"), records.get(name))
               for name, spec in sorted(meta["modules"].items(), key=lambda item: natural_key(item[0]))]
    return Inspection(checkpoint, bytes_on_disk(checkpoint), modules, meta.get("provenance", {}), metrics.allocation)
