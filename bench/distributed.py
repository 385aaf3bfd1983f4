"""Data-parallel benchmark: wall time of a run on 1 process vs N processes (torchrun, gloo on CPU), and
whether their checkpoints agree.

    python bench/distributed.py [--recipe recipes/demo-lord.yaml] [--nprocs 1,2] [--num-samples 32]
                                [--no-eval] [--cores 2] [--out runs/bench-distributed]

Every row is a real `python -m torch.distributed.run --standalone --nproc-per-node N -m lrcompress run`
launched by this script, one after the other, with the same recipe and calibration windows. Each process
gets cores/N torch threads (OMP_NUM_THREADS), so every row uses the whole machine. `wall s` is the whole
command (interpreter start, model load, calibration, compression, writing, evaluation on rank 0);
`compress s` is the run's own `timing.compress` (rank 0: the calibration + compression the processes
share). Ratios are against the first row (N=1), measured in the same invocation. After the table, every
row's checkpoint is compared with the first: each compressed module's dense weight W' = f(factors) and
every other tensor, as the largest relative difference max|a-b| / max|a|.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3          # largest relative difference for "agree": summation order, not a different result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo-lord.yaml", help="the run to time (SmolLM2, LoRD 0.2)")
    parser.add_argument("--nprocs", default="1,2", help="process counts, the first is the reference")
    parser.add_argument("--num-samples", type=int, default=None, help="override calibration.num_samples")
    parser.add_argument("--max-windows", type=int, default=None, help="override the eval max_windows")
    parser.add_argument("--no-eval", action="store_true", help="skip perplexity (times calibration + compression)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores shared by the processes")
    parser.add_argument("--out", default="runs/bench-distributed", help="where the checkpoints go")
    args = parser.parse_args()

    counts = [int(n) for n in args.nprocs.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    if args.num_samples:
        recipe["calibration"]["num_samples"] = args.num_samples
    recipe.setdefault("eval", {})["baseline"] = False
    if args.no_eval:
        recipe["eval"]["perplexity"] = []
    elif args.max_windows:
        for spec in recipe["eval"]["perplexity"]:
            spec["max_windows"] = args.max_windows

    cal, stage = recipe["calibration"], recipe["stages"][0]
    print(f"Recipe {args.recipe}: {recipe['model']['path']}, {stage['method']} {stage.get('ratio', '')}; "
          f"calibration {cal['num_samples']}×{cal['seq_len']}; eval {'off' if args.no_eval else 'on'}")
    print(f"Machine: {platform.machine()}, {args.cores} cores shared by the processes, torch {torch.__version__}, "
          "backend gloo (CPU)\n")
    print("| processes | threads / process | wall s | compress s | wall / N=1 | compress / N=1 | perplexity |")
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for count in counts:
        rows.append(run_one(recipe, count, max(args.cores // count, 1), out))
        first, row = rows[0], rows[-1]
        print(f"| {count} | {row['threads']} | {row['wall']:.1f} | {row['compress']:.1f} | "
              f"{row['wall'] / first['wall']:.2f} | {row['compress'] / first['compress']:.2f} | "
              f"{row['perplexity']} |", flush=True)

    print()
    agree = True
    for row in rows[1:]:
        worst = compare_checkpoints(rows[0]["dir"], row["dir"])
        ok = worst[0] <= TOLERANCE
        agree &= ok
        print(f"N={row['count']} vs N={rows[0]['count']}: largest relative difference {worst[0]:.2e} ({worst[1]}) "
              f"-> {'agree' if ok else 'DIFFER'} (tolerance {TOLERANCE:g})")
    sys.exit(0 if agree else 1)


def run_one(recipe: dict, count: int, threads: int, out: Path) -> dict:
    """One torchrun launch of the recipe on ``count`` processes; wall time and the run's metrics."""
    directory = out / f"nproc{count}"
    recipe = {**recipe, "output": {"dir": str(directory), "overwrite": True}}
    recipe_path = out / f"nproc{count}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
               "-m", "lrcompress", "--log-json", "run", str(recipe_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / f"nproc{count}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"N={count} failed (exit {done.returncode}); see {out / f'nproc{count}.log'}")
    from lrcompress.results import RunMetrics

    metrics = RunMetrics.load(directory / "metrics.json")
    ppl = metrics.eval.perplexity
    value = f"{next(iter(ppl.values())).value:.3f}" if ppl else "–"
    return {"count": count, "threads": threads, "wall": wall, "compress": metrics.timing["compress"],
            "perplexity": value, "dir": directory}


def compare_checkpoints(reference: Path, other: Path) -> tuple[float, str]:
    """(largest relative difference, where) over the compressed modules' dense weights and every other
    tensor: factors may differ by a sign or a rotation inside a degenerate subspace, products may not."""
    import lrcompress
    from lrcompress.modules import compressed_modules, dense_weight

    a, b = lrcompress.load(reference), lrcompress.load(other)
    worst = (0.0, "")
    compressed_a, compressed_b = dict(compressed_modules(a)), dict(compressed_modules(b))
    if compressed_a.keys() != compressed_b.keys():
        return float("inf"), "different compressed modules"
    pairs = [(name, dense_weight(m).detach(), dense_weight(compressed_b[name]).detach())
             for name, m in compressed_a.items()]
    inside = tuple(name + "." for name in compressed_a)
    state_b = b.state_dict()
    pairs += [(name, t, state_b[name]) for name, t in a.state_dict().items() if not name.startswith(inside)]
    for name, x, y in pairs:
        if x.shape != y.shape:
            return float("inf"), f"{name}: shapes differ"
        scale = float(x.double().abs().max()) or 1.0
        difference = float((x.double() - y.double()).abs().max()) / scale
        worst = max(worst, (difference, name))
    return worst


if __name__ == "__main__":
    main()
