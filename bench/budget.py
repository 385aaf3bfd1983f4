"""Budget allocation benchmark: uniform vs spectrum vs global, with and without output matching.

    python bench/budget.py [--methods whiten] [--ratios 0.2,0.3] [--strategies uniform,spectrum,global]
                           [--targets layer,original] [--threads 1] [--jsonl runs/budget.jsonl]

Every row is a real ``run_recipe`` on the demo model (recipes/whiten.yaml's model, calibration and
evaluation: 32 windows of 512 from wiki.valid, 40 test windows of 512 from wiki.test, all decoder-layer
linears), one after the other in this process. ``--targets original`` sets ``runtime.target: original``
(output matching); rows whose setting the installed lrcompress does not know are reported and skipped.
Each finished row is appended to ``--jsonl`` with its allocation summary (per module kind: mean rank and
the mean relative output error), and rows already there are not run again, so the grid can be resumed
or extended; the table printed at the end holds every row of the file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from lrcompress.errors import LrcompressError
from lrcompress.results import RunMetrics
from lrcompress.pipeline import ModuleRecord
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe


def row_key(method: str, ratio: float, strategy: str, target: str) -> str:
    return f"{method}/{ratio}/{strategy}/{target}"


def recipe_for(base: dict, method: str, ratio: float, strategy: str, target: str, threads: int) -> dict:
    data = json.loads(json.dumps(base))
    data["stages"] = [{"method": method, "ratio": ratio, "targets": ["*"], "allocation": strategy}]
    data["output"] = {"dir": "unused", "save": False}
    data["eval"]["baseline"] = False
    data.setdefault("runtime", {}).update({"threads": threads, "device": "cpu"})
    if target != "layer":
        data["runtime"]["target"] = target
    return data


def per_kind(metrics: RunMetrics) -> dict[str, dict[str, float]]:
    """Mean rank and mean relative output error per module kind (the 'why' next to each number)."""
    groups: dict[str, list[ModuleRecord]] = defaultdict(list)
    for m in metrics.modules:
        kind = ".".join(part for part in m.name.split(".")[3:])
        groups[kind].append(m)
    return {kind: {"mean_rank": sum(m.rank or 0 for m in ms) / len(ms),
                   "mean_error": sum(m.relative_error for m in ms) / len(ms)} for kind, ms in groups.items()}


def run_row(base: dict, method: str, ratio: float, strategy: str, target: str, threads: int) -> dict:
    recipe = parse_recipe(recipe_for(base, method, ratio, strategy, target, threads), "bench/budget.py")
    started = time.perf_counter()
    metrics = run_recipe(recipe).metrics
    ppl = next(iter(metrics.eval.perplexity.values())).value
    allocation = metrics.allocation.stages[0] if metrics.allocation else None
    return {"key": row_key(method, ratio, strategy, target), "method": method, "ratio": ratio,
            "strategy": strategy, "target": target, "perplexity": ppl, "threads": threads,
            "targeted_ratio": metrics.compression.targeted_ratio,
            "budget_params": allocation.budget_params if allocation else None,
            "allocated_params": allocation.allocated_params if allocation else None,
            "timing": metrics.timing, "run_seconds": time.perf_counter() - started,
            "per_kind": per_kind(metrics),
            "ranks": {m.name: m.rank for m in allocation.modules} if allocation else {}}


def table(rows: list[dict]) -> str:
    lines = ["| method | ratio | allocation | target | perplexity | targeted removed | compress s | allocation s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["ratio"], r["target"], r["strategy"])):
        t = r["timing"]
        lines.append(f"| {r['method']} | {r['ratio']} | {r['strategy']} | {r['target']} | {r['perplexity']:.2f} | "
                     f"{100 * r['targeted_ratio']:.2f}% | {t.get('compress', 0):.0f} | {t.get('allocation', 0):.0f} |")
    return "\n".join(lines)


def kinds_table(rows: list[dict]) -> str:
    """Per module kind: mean kept rank and mean relative output error of every row (the 'why')."""
    rows = sorted(rows, key=lambda r: (r["method"], r["ratio"], r["target"], r["strategy"]))
    kinds = sorted({kind for r in rows for kind in r["per_kind"]})
    head = "| module kind | " + " | ".join(f"{r['method']} {r['ratio']} {r['strategy']} {r['target']}" for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    for kind in kinds:
        cells = [f"{r['per_kind'][kind]['mean_rank']:.0f} / {r['per_kind'][kind]['mean_error']:.3f}"
                 if kind in r["per_kind"] else "–" for r in rows]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="recipes/whiten.yaml", help="recipe whose model/calibration/eval are used")
    parser.add_argument("--methods", default="whiten")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--strategies", default="uniform,spectrum,global")
    parser.add_argument("--targets", default="layer", help="layer (today) and/or original (output matching)")
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2"),
                        help="model path (default: $LRCOMPRESS_SMOLLM2, else the base recipe's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jsonl", default="runs/budget.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = yaml.safe_load(Path(args.base).read_text())
    if args.model:
        base["model"]["path"] = args.model
    path = Path(args.jsonl)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"]: json.loads(line) for line in path.read_text().splitlines()} if path.exists() else {}
    cal = base["calibration"]
    print(f"Model {base['model']['path']}; calibration {cal['dataset']} {cal['num_samples']}×{cal['seq_len']}; "
          f"eval {base['eval']['perplexity'][0]}; {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
          flush=True)
    for method in args.methods.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for target in args.targets.split(","):
                for strategy in args.strategies.split(","):
                    key = row_key(method, ratio, strategy, target)
                    if key in done:
                        continue
                    try:
                        row = run_row(base, method, ratio, strategy, target, args.threads)
                    except LrcompressError as error:
                        print(f"{key}: skipped ({error})", flush=True)
                        continue
                    done[key] = row
                    with path.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"{key}: perplexity {row['perplexity']:.2f} ({row['run_seconds']:.0f} s)", flush=True)
    print(table(list(done.values())))
    print("\nMean kept rank / mean relative output error per module kind:\n")
    print(kinds_table(list(done.values())))


if __name__ == "__main__":
    main()
