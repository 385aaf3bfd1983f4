"""PNG plots for reports and comparisons (matplotlib, Agg backend: no display needed).

matplotlib is imported inside each function: importing lrcompress must stay fast.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

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


def _series(modules: Iterable["ModuleRecord"], value) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """One (layers, values) series per (module kind, method), ordered by depth."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for m in modules:
        series[(module_kind(m.name), m.method)].append((m.layer, value(m)))
    return {key: ([p[0] for p in sorted(points)], [p[1] for p in sorted(points)])
            for key, points in sorted(series.items())}


LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def _styles(keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """A distinct colour per module kind (tab10, then tab20 beyond ten kinds) and a line style and marker
    per method, so that two stages of one module share a colour and differ in style."""
    plt = _pyplot()
    keys = list(keys)
    kinds = list(dict.fromkeys(kind for kind, _ in keys))
    methods = list(dict.fromkeys(method for _, method in keys))
    palette = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    return {(kind, method): {"color": palette(kinds.index(kind) % palette.N),
                             "linestyle": LINESTYLES[methods.index(method) % len(LINESTYLES)],
                             "marker": MARKERS[methods.index(method) % len(MARKERS)]}
            for kind, method in keys}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def linear_limits(values: list[float]) -> tuple[float, float]:
    """y-limits for a non-negative quantity that never zoom a flat line into fake variation: from 0 to a
    little above the largest value."""
    return 0.0, max(1.08 * max(values), 1e-12)


def _line_plot(series, title: str, ylabel: str, path: Path, log_y: bool, limits: tuple[float, float] | None,
               references: dict[str, float] | None = None) -> Path:
    """One line per (module kind, method) across depth; ``references`` adds a thin dashed horizontal line
    per module kind in that kind's colour (e.g. the uniform rank a budget allocation departed from)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    styles = _styles(series)
    for (kind, method), (xs, ys) in series.items():
        ax.plot(xs, ys, markersize=3, linewidth=1, label=f"{kind} ({method})", **styles[(kind, method)])
        if references and kind in references:
            ax.axhline(references[kind], color=styles[(kind, method)]["color"], linestyle="--", linewidth=0.6)
    if log_y:
        ax.set_yscale("log")
    elif limits is not None:
        ax.set_ylim(*limits)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)   # beside, not over
    return _save(fig, path)


def plot_module_errors(modules: list["ModuleRecord"], path: Path) -> Path:
    """Relative output error of every compressed module across depth, one colour per module kind and
    one line style per method; linear from 0 unless the errors span more than 20×."""
    series = _series(modules, lambda m: m.relative_error)
    values = [v for _, ys in series.values() for v in ys]
    log_y = bool(values) and min(values) > 0 and max(values) / min(values) > 20
    return _line_plot(series, "relative output error per module (calibration inputs)", "‖X(W−Ŵ)ᵀ‖ / ‖XWᵀ‖",
                      path, log_y, linear_limits(values) if values else None)


def kept_fraction(module: "ModuleRecord") -> float:
    """Bytes after / before when recorded (quantization keeps every parameter but few bytes), else params."""
    if module.bytes_before:
        return module.bytes_after / module.bytes_before
    return module.params_after / module.params_before if module.params_before else 0.0


def plot_kept_params(modules: list["ModuleRecord"], path: Path) -> Path:
    """Fraction of each module's bytes kept (after / before), on a 0–1 axis: a uniform ratio is a flat
    line at its value, not a zoomed-in wiggle."""
    series = _series(modules, kept_fraction)
    values = [v for _, ys in series.values() for v in ys]
    return _line_plot(series, "kept size per module (bytes after / before)", "bytes after / before", path, False,
                      (0.0, max(1.05, 1.05 * max(values))) if values else None)


def kept_rank(module: "ModuleRecord") -> int | None:
    """A module's rank, or its sparsity for methods whose knob is one (CoSpaDi's s)."""
    return module.rank if module.rank is not None else (module.details or {}).get("sparsity")


def plot_kept_rank(modules: list["ModuleRecord"], path: Path, uniform: dict[str, int] | None = None) -> Path:
    """Kept rank (or sparsity) of every module across depth, one colour per module kind and one style per
    method; with a budget allocation, the uniform rank of each kind as a thin dashed line of its colour."""
    series = _series([m for m in modules if kept_rank(m) is not None], kept_rank)
    values = [v for _, ys in series.values() for v in ys] + list((uniform or {}).values())
    title = "kept rank per layer and module kind" + (" (dashed: uniform)" if uniform else "")
    return _line_plot(series, title, "kept rank", path, False, linear_limits(values) if values else None,
                      references=uniform)


def plot_rate_distortion(points: dict[str, list[tuple[float, float]]], path: Path, metric: str,
                         dense: tuple[float, float] | None = None) -> Path:
    """Perplexity against the whole model's size in bytes (MiB on the axis), one line per method; the
    dense model as a star at its own size. Smaller and lower is better."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    palette = plt.get_cmap("tab10")
    for number, (method, pairs) in enumerate(sorted(points.items())):
        pairs = sorted(pairs)
        ax.plot([b / 2**20 for b, _ in pairs], [p for _, p in pairs], marker=MARKERS[number % len(MARKERS)],
                color=palette(number % palette.N), label=method)
    if dense is not None:
        ax.scatter([dense[0] / 2**20], [dense[1]], marker="*", s=150, color="black", zorder=5, label="dense")
    values = [p for pairs in points.values() for _, p in pairs] + ([dense[1]] if dense is not None else [])
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    elif values:
        ax.set_ylim(*linear_limits(values))
    sizes = [b / 2**20 for pairs in points.values() for b, _ in pairs] + ([dense[0] / 2**20] if dense else [])
    if sizes:
        ax.set_xlim(0, 1.05 * max(sizes))
    ax.set_xlabel("whole-model weights (MiB)")
    ax.set_ylabel(metric)
    ax.set_title("rate–distortion")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_budget_bits(modules: Iterable[Any], path: Path) -> Path:
    """A byte budget's choice as stored bits per weight (8·bytes / weight values, scales and factors
    included) across depth, one line per module kind (``modules``: ``bytebudget.BudgetedModule``)."""
    points: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for m in modules:
        points[(m.kind, "byte budget")].append((m.layer, 8.0 * m.bytes / max(m.weights, 1)))
    series = {key: ([p[0] for p in sorted(v)], [p[1] for p in sorted(v)]) for key, v in sorted(points.items())}
    values = [v for _, ys in series.values() for v in ys]
    return _line_plot(series, "byte budget: stored bits per weight per module", "bits per weight", path, False,
                      linear_limits(values) if values else None)
