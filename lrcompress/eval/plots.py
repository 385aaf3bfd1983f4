"""PNG plots for reports and comparisons (matplotlib, Agg backend: no display needed).

matplotlib is imported inside each function: importing lrcompress must stay fast.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from ..pipeline.records import ModuleRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def module_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``: the same module at every depth."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[index + 1:]) or name
    return name


def _series(modules: Iterable["ModuleRecord"], value) -> dict[str, tuple[list[int], list[float]]]:
    """One (layers, values) series per module kind and method, ordered by depth."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for m in modules:
        series[f"{module_kind(m.name)} ({m.method})"].append((m.layer, value(m)))
    return {label: ([p[0] for p in sorted(points)], [p[1] for p in sorted(points)])
            for label, points in sorted(series.items())}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _line_plot(series, title: str, ylabel: str, path: Path, log_y: bool) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=label)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_module_errors(modules: list["ModuleRecord"], path: Path) -> Path:
    """Relative output error of every compressed module across depth, one line per module kind."""
    series = _series(modules, lambda m: m.relative_error)
    values = [v for _, ys in series.values() for v in ys]
    log_y = bool(values) and min(values) > 0 and max(values) / min(values) > 20
    return _line_plot(series, "relative output error per module (calibration inputs)",
                      "‖X(W−Ŵ)ᵀ‖ / ‖XWᵀ‖", path, log_y)


def plot_kept_params(modules: list["ModuleRecord"], path: Path) -> Path:
    """Fraction of each module's parameters kept (after / before), one line per module kind."""
    series = _series(modules, lambda m: m.params_after / m.params_before if m.params_before else 0.0)
    return _line_plot(series, "kept parameters per module", "params after / before", path, False)


def plot_rate_distortion(points: dict[str, list[tuple[float, float]]], path: Path, metric: str,
                         dense: float | None = None) -> Path:
    """Perplexity against whole-model ratio removed, one line per method; the dense model at ratio 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pairs in sorted(points.items()):
        pairs = sorted(pairs)
        ax.plot([100 * r for r, _ in pairs], [p for _, p in pairs], marker="o", label=method)
    if dense is not None:
        ax.scatter([0.0], [dense], marker="*", s=150, color="black", zorder=5, label="dense")
    values = [p for pairs in points.values() for _, p in pairs] + ([dense] if dense is not None else [])
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("whole-model parameters removed (%)")
    ax.set_ylabel(metric)
    ax.set_title("rate–distortion")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)
