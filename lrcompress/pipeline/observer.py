"""Progress callbacks: the pipeline reports, the CLI decides how to show it (rich bars or log lines)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .memory import describe_peak_memory, peak_cuda_bytes, peak_rss_bytes
from .records import ModuleRecord

log = logging.getLogger("lrcompress.pipeline")
# Structured fields travel in ``extra={"fields": {...}}`` (the JSON-lines formatter flattens them).


@dataclass(frozen=True)
class PlannedWork:
    """One target module of one stage, with its size: the unit of the ETA."""

    layer: int
    stage: int
    params: int


@dataclass
class WorkProgress:
    """Layers and modules done out of the total, and the ETA from the work left.

    ETA = Σ over stages of (parameters of that stage's unfinished modules × that stage's measured seconds
    per parameter of finished modules; the mean over all stages until one of its modules finished)
    + the rest of the wall time so far (statistics passes, propagation) per finished parameter × the
    parameters left. So an expensive method (CoSpaDi) and a cheap one (RTN) in one recipe each cost what
    they were measured to cost, and untargeted layers cost nothing. Modules of a layer that ends without
    reporting them (a resumed run replays finished layers) leave the work left without adding time."""

    total: int = 0
    done: int = 0
    work: dict[tuple[int, int], list[int]] = field(default_factory=dict)   # (layer, stage) -> sizes left
    modules_total: int = 0
    modules_done: int = 0
    stage_seconds: dict[int, float] = field(default_factory=dict)
    stage_params: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    clock: Callable[[], float] = time.perf_counter

    def plan(self, items: list[PlannedWork]) -> None:
        self.work, self.modules_total = {}, len(items)
        for item in items:
            self.work.setdefault((item.layer, item.stage), []).append(item.params)
        self.started = self.clock()

    def module_done(self, layer: int, stage: int, params: int, seconds: float) -> None:
        """``params``: the module's size as planned (a later stage may see it already compressed, so a
        size that is not in the plan takes the plan's first entry of that layer and stage instead)."""
        left = self.work.get((layer, stage), [])
        planned = left.pop(left.index(params) if params in left else 0) if left else params
        self.modules_done += 1
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.stage_params[stage] = self.stage_params.get(stage, 0) + planned

    def finish(self, layer: int) -> None:
        """Layer ``layer`` ended: whatever of it was not reported is done too."""
        self.done += 1
        for key in [key for key in self.work if key[0] == layer]:
            self.modules_done += len(self.work.pop(key))

    @property
    def eta_seconds(self) -> float | None:
        left = {}
        for (_, stage), sizes in self.work.items():
            left[stage] = left.get(stage, 0) + sum(sizes)
        if not sum(left.values()):
            return 0.0 if self.done or self.modules_done else None
        done = sum(self.stage_params.values())
        if not done:
            return None
        module_seconds = sum(self.stage_seconds.values())
        overhead = max(self.clock() - self.started - module_seconds, 0.0) / done
        mean = module_seconds / done
        return sum(params * (self.stage_seconds[stage] / self.stage_params[stage] if self.stage_params.get(stage)
                             else mean) for stage, params in left.items()) + overhead * sum(left.values())

    def eta_text(self) -> str:
        eta = self.eta_seconds
        return f"ETA {'?' if eta is None else format_duration(eta)}"

    def describe(self) -> str:
        return f"{self.done}/{self.total} layers, {self.modules_done}/{self.modules_total} modules, {self.eta_text()}"

    def fields(self) -> dict[str, Any]:
        """For JSON log lines: done, total, ETA, and the peak memory so far."""
        return {"layers_done": self.done, "layers_total": self.total, "modules_done": self.modules_done,
                "modules_total": self.modules_total, "eta_seconds": self.eta_seconds,
                "peak_rss_bytes": peak_rss_bytes(), "peak_cuda_bytes": peak_cuda_bytes()}


def format_duration(seconds: float) -> str:
    """4s, 3m07s, 2h05m."""
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class PipelineObserver:
    """No-op base; override what you want to show."""

    def phase(self, description: str) -> None: ...

    def layers_started(self, total: int) -> None: ...

    def work_planned(self, work: list[PlannedWork]) -> None:
        """Every target module ahead, with its size (called once, after ``layers_started``)."""

    def layer_started(self, index: int, modules: int) -> None: ...

    def module_done(self, record: ModuleRecord) -> None: ...

    def layer_done(self, index: int, seconds: float) -> None: ...

    def finished(self) -> None: ...


class LoggingObserver(PipelineObserver):
    """Plain log lines, for logs and non-terminal output: one per module as it finishes, one per layer."""

    def __init__(self) -> None:
        self.progress = WorkProgress()

    def phase(self, description: str) -> None:
        log.info("%s", description)

    def layer_started(self, index: int, modules: int) -> None:
        log.info("layer %d: compressing %d modules", index, modules)

    def layers_started(self, total: int) -> None:
        self.progress = WorkProgress(total)

    def work_planned(self, work: list[PlannedWork]) -> None:
        self.progress.plan(work)

    def module_done(self, record: ModuleRecord) -> None:
        self.progress.module_done(record.layer, record.stage, record.params_before, record.seconds)
        rank = f" rank {record.rank}" if record.rank is not None else ""
        log.info("  %s [%s%s] rel.err %.4f %s %.2fs; %s", record.name, record.method, rank,
                 record.relative_error, record.numerical_path, record.seconds, self.progress.describe(),
                 extra={"fields": {"event": "module", **record.to_dict(), **self.progress.fields()}})

    def layer_done(self, index: int, seconds: float) -> None:
        self.progress.finish(index)
        log.info("layer %d done in %.1fs; %s; %s", index, seconds, self.progress.describe(), describe_peak_memory(),
                 extra={"fields": {"event": "layer", "layer": index, "seconds": seconds, **self.progress.fields()}})
