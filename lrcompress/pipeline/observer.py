"""Progress callbacks: the pipeline reports, the CLI decides how to show it (rich bars or log lines)."""
from __future__ import annotations

import logging

from .memory import describe_peak_memory, peak_cuda_bytes, peak_rss_bytes
from .records import ModuleRecord

log = logging.getLogger("lrcompress.pipeline")
# Structured fields travel in ``extra={"fields": {...}}`` (the JSON-lines formatter flattens them).


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
        self.total_layers = total

    def module_done(self, record: ModuleRecord) -> None:
        rank = f" rank {record.rank}" if record.rank is not None else ""
        log.info("  %s [%s%s] rel.err %.4f %s %.2fs", record.name, record.method, rank,
                 record.relative_error, record.numerical_path, record.seconds,
                 extra={"fields": {"event": "module", **record.to_dict()}})

    def layer_done(self, index: int, seconds: float) -> None:
        total = getattr(self, "total_layers", 0)
        log.info("layer %d/%d done in %.1fs; %s", index + 1, total, seconds, describe_peak_memory(),
                 extra={"fields": {"event": "layer", "layer": index, "layers_total": total, "seconds": seconds,
                                   "peak_rss_bytes": peak_rss_bytes(), "peak_cuda_bytes": peak_cuda_bytes()}})
