"""report.md: the recipe, the headline numbers and the per-module table of one run."""
from __future__ import annotations

from typing import Any


def _fmt_ratio(value: float) -> str:
    return f"{100 * value:.1f}%"


def render_report(metrics: dict[str, Any], recipe_yaml: str) -> str:
    c = metrics["compression"]
    lines = ["# lrcompress run report", "", "## Result", ""]
    lines += ["| metric | value |", "|---|---|",
              f"| targeted modules | {c['targeted_modules']} |",
              f"| targeted ratio (removed) | {_fmt_ratio(c['targeted_ratio'])} |",
              f"| whole-model ratio (removed) | {_fmt_ratio(c['model_ratio'])} |",
              f"| parameters | {c['model_params_before']:,} → {c['model_params_after']:,} |"]
    if c.get("targeted_bytes_ratio") is not None:
        lines.append(f"| targeted bytes | {c['targeted_bytes_before']:,} → {c['targeted_bytes_after']:,} "
                     f"({_fmt_ratio(c['targeted_bytes_ratio'])} removed) |")
    if c.get("bytes") is not None:
        lines.append(f"| bytes on disk (weights) | {c['bytes']:,} (dense: {c['dense_bytes']:,}) |")
    for name, result in metrics.get("eval", {}).get("perplexity", {}).items():
        lines.append(f"| perplexity {name} | {result['value']:.3f} |")
    for name, result in metrics.get("eval", {}).get("baseline_perplexity", {}).items():
        lines.append(f"| dense perplexity {name} | {result['value']:.3f} |")
    protocols = [r["protocol"] for r in metrics.get("eval", {}).get("perplexity", {}).values()]
    if protocols:
        lines += ["", "Protocol: " + "; ".join(protocols)]
    timing = metrics.get("timing", {})
    if timing:
        lines += ["", "Timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items())]
    lines += ["", "## Modules", "",
              "| module | method | shape (out×in) | params before → after | rank | rel. output error | path | s |",
              "|---|---|---|---|---|---|---|---|"]
    for m in metrics.get("modules", []):
        lines.append(f"| {m['name']} | {m['method']} | {m['out_features']}×{m['in_features']} | "
                     f"{m['params_before']:,} → {m['params_after']:,} | {m['rank'] if m['rank'] is not None else '–'} | "
                     f"{m['relative_error']:.4f} | {m['numerical_path']} | {m['seconds']:.2f} |")
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
