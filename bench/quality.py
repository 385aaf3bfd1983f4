"""Quality benchmark: perplexity and wall time of each method at each ratio on the demo model, one table.

    python bench/quality.py [--methods svd,whiten,lord] [--ratios 0.1,0.2,0.3] [--base recipes/demo-lord.yaml]

Every row is a real `run_recipe` (load, calibrate, compress, evaluate) in this one process, so the rows
are comparable: same calibration windows (same seed), same evaluation windows, same machine state.
The dense row is measured in the same run; `ppl / dense` is the ratio against it.
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch
import yaml

from lrcompress.eval import EvalContext, perplexity
from lrcompress.results import RunMetrics
from lrcompress.models import load_model
from lrcompress.recipe import PerplexitySpec, parse_recipe
from lrcompress.runner import run_recipe
from lrcompress.data import data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="recipes/demo-lord.yaml", help="recipe whose model/calibration/eval are used")
    parser.add_argument("--methods", default="svd,whiten,lord")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--num-samples", type=int, default=None, help="override calibration.num_samples")
    parser.add_argument("--max-windows", type=int, default=None, help="override the eval max_windows")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a shared machine)")
    parser.add_argument("--no-sequential", action="store_true", help="statistics from the uncompressed model")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    base = yaml.safe_load(Path(args.base).read_text())
    base["output"] = {"dir": "unused", "save": False}
    base["eval"]["baseline"] = False
    if args.num_samples:
        base["calibration"]["num_samples"] = args.num_samples
    if args.max_windows:
        for spec in base["eval"]["perplexity"]:
            spec["max_windows"] = args.max_windows
    base.setdefault("runtime", {})["sequential"] = not args.no_sequential
    ppl_spec = base["eval"]["perplexity"][0]

    cal = base["calibration"]
    print(f"Model {base['model']['path']}; calibration {cal['dataset']}/{cal.get('split', 'validation')} "
          f"{cal['num_samples']}×{cal['seq_len']} seed {cal.get('seed', 0)}; all decoder-layer linears; "
          f"sequential={not args.no_sequential}")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| method | ratio | perplexity | ppl / dense | compress s | run s | pre-pass |")
    print("|---|---|---|---|---|---|---|", flush=True)  # rows are printed as they are measured

    started = time.perf_counter()
    loaded = load_model(base["model"]["path"], base["model"].get("dtype", "float32"))
    dense = perplexity(loaded.model, loaded.tokenizer, PerplexitySpec(**ppl_spec),
                       EvalContext(data_dir(None, base.get("data_dir"))))
    del loaded
    print(f"| dense | - | {dense.value:.2f} | 1.00× | 0 | {time.perf_counter() - started:.0f} | - |", flush=True)
    for method in args.methods.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            recipe = copy.deepcopy(base)
            recipe["stages"] = [{"method": method, "ratio": ratio, "targets": ["*"]}]
            started = time.perf_counter()
            result = run_recipe(parse_recipe(recipe, f"{args.base} ({method} {ratio})"))
            total = time.perf_counter() - started
            value = next(iter(result.metrics.eval.perplexity.values())).value
            print(f"| {method} | {ratio:.1f} | {value:.2f} | {value / dense.value:.2f}× | "
                  f"{result.metrics.timing['compress']:.0f} | {total:.0f} | {_prepass_cell(result.metrics)} |",
                  flush=True)
    print(f"\nPerplexity: {dense.protocol}")

def _prepass_cell(metrics: RunMetrics) -> str:
    """Whole-model pre-passes (FWSVD's Fisher pass): seconds and peak-memory growth, or '-' when none ran."""
    reports = metrics.prepass or {}
    cells = []
    for kind, report in reports.items():
        growth = report.get("peak_memory_growth_bytes")
        memory = f", +{growth / 2**20:.0f} MiB peak ({report.get('memory_measure')})" if growth is not None else ""
        cells.append(f"{kind} {metrics.timing.get('prepass', 0):.0f} s{memory}")
    return "; ".join(cells) or "-"


if __name__ == "__main__":
    main()
