"""The cost model's prediction (``lrcompress.pipeline.costs``) as ``run --dry-run`` shows it."""
from __future__ import annotations

from rich.table import Table

from ..pipeline.costs import GIB, RunCosts
from ..pipeline.observer import format_duration


def cost_table(costs: RunCosts) -> Table:
    """Time per phase and the memory terms, the dominant ones named, then the notes and any refusal."""
    table = Table(title=f"predicted cost on {costs.device} (rates: {costs.rates_source})", title_justify="left")
    table.add_column("quantity")
    table.add_column("predicted", justify="right")
    table.add_column("share", justify="right")
    total = costs.total_seconds or 1.0
    for phase, seconds in costs.phases.items():
        mark = " (dominant)" if phase == costs.dominant_phase else ""
        table.add_row(f"time: {phase}{mark}", format_duration(seconds), f"{seconds / total:.0%}")
    for method, seconds in costs.methods.items():
        table.add_row(f"  decompositions: {method}", format_duration(seconds), f"{seconds / total:.0%}")
    table.add_row("time: total", format_duration(costs.total_seconds), "")
    table.add_row("time per decoder layer (slowest)", format_duration(costs.layer_seconds), "", end_section=True)
    host = costs.peak_host_bytes or 1.0
    table.add_row("peak host memory", f"{costs.peak_host_bytes / GIB:.2f} GiB", "")
    for name, value in costs.host_parts.items():
        mark = " (dominant)" if name == costs.dominant_memory else ""
        table.add_row(f"  {name}{mark}", f"{value / GIB:.2f} GiB", f"{value / host:.0%}")
    if costs.peak_device_bytes is not None:
        table.add_row("peak device memory", f"{costs.peak_device_bytes / GIB:.2f} GiB", "")
        for name, value in costs.device_parts.items():
            table.add_row(f"  {name}", f"{value / GIB:.2f} GiB", f"{value / costs.peak_device_bytes:.0%}")
    table.add_row("disk (output = staging, renamed)", f"{costs.disk_bytes / GIB:.2f} GiB", "")
    return table


def cost_lines(costs: RunCosts) -> list[str]:
    """The notes, then what would not fit (a run refuses it unless runtime.check_fit is false)."""
    lines = [f"note: {note}" for note in costs.notes]
    lines += [f"would not fit: {refusal} (a run refuses it; runtime.check_fit: false overrides)"
              for refusal in costs.refusals]
    return lines
