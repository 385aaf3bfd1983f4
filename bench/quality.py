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
import sys
import time
from pathlib import Path

import torch
import yaml

from lrcompress.eval import perplexity
from lrcompress.models import load_model
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from lrcompress.data import data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="recipes/demo-lord.yaml", help="recipe whose model/calibration/eval are used")
    parser.add_argument("--methods", default="svd,whiten,lord")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--num-samples", type=int, default=None, help="override calibration.num_samples")
    parser.add_argument("--max-windows", type=int, default=None, help="override the eval max_windows")
    parser.add_argument("--no-sequential", action="store_true", help="statistics from the uncompressed model")
    args = parser.parse_args()

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

    rows = []
    started = time.perf_counter()
    loaded = load_model(base["model"]["path"], base["model"].get("dtype", "float32"))
    dense = perplexity(loaded.model, loaded.tokenizer, ppl_spec["dataset"], ppl_spec["split"], ppl_spec["seq_len"],
                       ppl_spec.get("max_windows"), data_dir(None, base.get("data_dir")), 4)
    rows.append(("dense", "-", dense.value, 0.0, time.perf_counter() - started))
    del loaded
    print(f"dense: {dense.value:.3f}  [{dense.protocol}]", file=sys.stderr, flush=True)
    for method in args.methods.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            recipe = copy.deepcopy(base)
            recipe["stages"] = [{"method": method, "ratio": ratio, "targets": ["*"]}]
            started = time.perf_counter()
            result = run_recipe(parse_recipe(recipe, f"{args.base} ({method} {ratio})"))
            total = time.perf_counter() - started
            value = next(iter(result.metrics["eval"]["perplexity"].values()))["value"]
            rows.append((method, f"{ratio:.1f}", value, result.metrics["timing"]["compress"], total))
            print(f"{method} {ratio}: {value:.3f} ({total:.0f}s)", file=sys.stderr, flush=True)

    cal = base["calibration"]
    print(f"\nModel {base['model']['path']}; calibration {cal['dataset']}/{cal.get('split', 'validation')} "
          f"{cal['num_samples']}×{cal['seq_len']} seed {cal.get('seed', 0)}; all decoder-layer linears; "
          f"sequential={not args.no_sequential}")
    print(f"Perplexity: {dense.protocol}")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| method | ratio | perplexity | ppl / dense | compress s | run s |")
    print("|---|---|---|---|---|---|")
    for method, ratio, value, compress, total in rows:
        print(f"| {method} | {ratio} | {value:.2f} | {value / dense.value:.2f}× | {compress:.0f} | {total:.0f} |")


if __name__ == "__main__":
    main()
