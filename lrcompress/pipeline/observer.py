"""Progress callbacks: the pipeline reports, the CLI decides how to show it (rich bars or log lines)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .memory import describe_peak_memory, peak_cuda_bytes, peak_rss_bytes
from .records import ModuleRecord

log = logging.getLogger("lrcompress.pipeline")
# Structured fields travel in ``extra={"fields": {...}}`` (the JSON-lines formatter flattens them).


@dataclass
class LayerProgress:
    """Layers done out of the total and the ETA: mean seconds of a finished layer × layers remaining."""

    total: int = 0
    done: int = 0
    seconds: float = 0.0

    def finish(self, seconds: float) -> None:
        self.done += 1
        self.seconds += seconds

    @property
    def eta_seconds(self) -> float | None:
        return self.seconds / self.done * max(self.total - self.done, 0) if self.done else None

    def eta_text(self) -> str:
        eta = self.eta_seconds
        return f"ETA {'?' if eta is None else format_duration(eta)}"

    def describe(self) -> str:
        return f"{self.done}/{self.total} layers, {self.eta_text()}"

    def fields(self) -> dict[str, Any]:
        """For JSON log lines: done, total, ETA, and the peak memory so far."""
        return {"layers_done": self.done, "layers_total": self.total, "eta_seconds": self.eta_seconds,
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

    def layer_started(self, index: int, modules: int) -> None: ...

    def module_done(self, record: ModuleRecord) -> None: ...

    def layer_done(self, index: int, seconds: float) -> None: ...

    def finished(self) -> None: ...


class LoggingObserver(PipelineObserver):
    """Plain log lines, for logs and non-terminal output."""

    def phase(self, description: str) -> None:
        log.info("%s", description)

    def layer_started(self, index: int, modules: int) -> None:
        log.info("layer %d: compressing %d modules", index, modules)

    def layers_started(self, total: int) -> None:
        self.progress = LayerProgress(total)

    def module_done(self, record: ModuleRecord) -> None:
        rank = f" rank {record.rank}" if record.rank is not None else ""
        log.info("  %s [%s%s] rel.err %.4f %s %.2fs", record.name, record.method, rank,
                 record.relative_error, record.numerical_path, record.seconds,
                 extra={"fields": {"event": "module", **record.to_dict()}})

    def layer_done(self, index: int, seconds: float) -> None:
        progress = getattr(self, "progress", None) or LayerProgress()
        progress.finish(seconds)
        log.info("layer %d done in %.1fs; %s; %s", index, seconds, progress.describe(), describe_peak_memory(),
                 extra={"fields": {"event": "layer", "layer": index, "seconds": seconds, **progress.fields()}})
