"""Output matching on a real model: each recipe with runtime.target layer (default) and original.

    LRCOMPRESS_DATA=... python bench/matching.py --model models/smollm2-135m --out runs/matching            # run
    python bench/matching.py --out runs/matching --table-only                                              # table

Every row is a full ``lrcompress run`` (one process each, one at a time, ``runtime.threads`` threads), so the
peak resident set (``memory.process_peak_rss_bytes``) and the compression time are the run's own. A finished
row (its metrics.json exists) is not run again. The table reads each row's metrics.json: perplexity, the
compression wall time, the extra time output matching reports (``output_matching.extra_seconds``), the peak
resident set of the process, and the mean relative output error of the modules against the original model's
outputs (for target original; for target layer the records' own error on the compressed inputs).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from frontier import run_lrcompress
from lrcompress.results import RunMetrics

ROWS = {  # name -> (recipe, overrides)
    "whiten-0.2": ("recipes/whiten.yaml", ["stages.0.ratio=0.2"]),
    "whiten-0.3": ("recipes/whiten.yaml", ["stages.0.ratio=0.3"]),
    "gptq4": ("recipes/gptq.yaml", ["stages.0.bits=4"]),
    "gptq3": ("recipes/gptq.yaml", ["stages.0.bits=3"]),
}
TARGETS = ("layer", "original")


def run_row(name: str, target: str, model: str, out: Path, threads: int) -> None:
    recipe, overrides = ROWS[name]
    sets = overrides + [f"runtime.target={target}", f"model.path={model}", f"runtime.threads={threads}"]
    run_lrcompress(out / f"{name}-{target}", recipe, sets)


def table(out: Path) -> str:
    lines = ["| recipe | target | perplexity | compress s | matching extra s | peak RSS GiB | mean module error |",
             "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        for target in TARGETS:
            path = out / f"{name}-{target}" / "metrics.json"
            if not path.is_file():
                lines.append(f"| {name} | {target} | (not run) | | | | |")
                continue
            m = RunMetrics.load(path)
            ppl = next(iter(m.eval.perplexity.values())).value
            extra = m.output_matching.extra_seconds if m.output_matching else None
            errors = [r.relative_error for r in m.modules]
            lines.append(f"| {name} | {target} | {ppl:.2f} | {m.timing['compress']:.0f} | "
                         f"{'–' if extra is None else f'{extra:.0f}'} | "
                         f"{m.memory.process_peak_rss_bytes / 2**30:.2f} | {sum(errors) / len(errors):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("runs/matching"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in args.rows.split(","):
            for target in TARGETS:
                run_row(name, target, args.model, args.out, args.threads)
    print(table(args.out))


if __name__ == "__main__":
    main()
