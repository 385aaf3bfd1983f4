"""Scale benchmark: peak host memory (RSS) and wall time of one recipe in the default mode and in lazy
mode (``runtime.lazy``), one markdown table.

    python bench/scale.py [--base recipes/demo-lord.yaml] [--ratio 0.2] [--num-samples N] [--max-windows N]
                          [--threads N] [--modes default,lazy]

Each mode is a fresh subprocess (this script with ``--child MODE``), so its peak RSS (VmHWM: this
process image only, where ru_maxrss would inherit the parent's) is that mode's own lifetime peak
(imports, load, calibration, compression, writing, evaluation); the table also gives the
growth of the resident set during the compression phase alone (sampled, metrics.json "memory"). Ratios
are against the default mode measured in the same invocation. The model size on disk is printed above
the table, to read the peaks against. Both runs write a checkpoint (lazy mode needs one) into a
temporary directory that is removed afterwards; the dense baseline evaluation is off.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def child(args: argparse.Namespace) -> None:
    """One mode, in this process: run the recipe, print one JSON line with the measurements."""
    import torch

    from lrcompress.pipeline.memory import image_peak_rss_bytes
    from lrcompress.recipe import load_recipe
    from lrcompress.runner import run_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"stages.0.ratio={args.ratio}", f"output.dir={Path(args.out) / args.child}", "output.overwrite=true",
                 "eval.baseline=false", f"runtime.lazy={str(args.child == 'lazy').lower()}"]
    if args.num_samples:
        overrides.append(f"calibration.num_samples={args.num_samples}")
    if args.max_windows:
        overrides.append(f"eval.perplexity.0.max_windows={args.max_windows}")
    recipe = load_recipe(args.base, overrides)
    started = time.perf_counter()
    metrics = run_recipe(recipe).metrics
    seconds = time.perf_counter() - started
    ppl = next(iter(metrics.eval.perplexity.values()))
    print(json.dumps({
        "peak_rss": image_peak_rss_bytes(),
        "compress_growth": metrics.memory.compress["peak_memory_growth_bytes"],
        "run_seconds": seconds, "compress_seconds": metrics.timing["compress"],
        "perplexity": ppl.value, "protocol": ppl.protocol, "bytes": metrics.compression.bytes,
    }))


def measure(mode: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--out", str(out), "--base", args.base,
               "--ratio", str(args.ratio)]
    for flag in ("num_samples", "max_windows", "threads"):
        if getattr(args, flag):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} mode failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def model_bytes(source: str) -> int:
    from lrcompress.models.lazy import lazy_model_dir

    return sum(p.stat().st_size for p in lazy_model_dir(source).glob("*.safetensors"))


def table(results: dict[str, dict]) -> list[str]:
    base = results.get("default")
    lines = ["| mode | peak RSS GiB | RSS / default | compress-phase RSS growth GiB | process s | time / default "
             "| compress s | perplexity |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        rss_ratio = f"{r['peak_rss'] / base['peak_rss']:.2f}" if base else "—"
        time_ratio = f"{r['process_seconds'] / base['process_seconds']:.2f}" if base else "—"
        growth = r["compress_growth"]
        lines.append(f"| {mode} | {r['peak_rss'] / GIB:.3f} | {rss_ratio} | "
                     f"{growth / GIB if growth is not None else float('nan'):.3f} | {r['process_seconds']:.1f} | "
                     f"{time_ratio} | {r['compress_seconds']:.1f} | {r['perplexity']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="recipes/demo-lord.yaml", help="recipe (its first stage's ratio is set)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=None, help="override calibration.num_samples")
    parser.add_argument("--max-windows", type=int, default=None, help="override the eval max_windows")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--modes", default="default,lazy")
    parser.add_argument("--child", choices=["default", "lazy"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import yaml

    recipe = yaml.safe_load(Path(args.base).read_text())
    cal = recipe["calibration"]
    print(f"Model {recipe['model']['path']} ({model_bytes(recipe['model']['path']) / GIB:.3f} GiB of safetensors); "
          f"{recipe['stages'][0]['method']} ratio {args.ratio}; calibration "
          f"{args.num_samples or cal['num_samples']}×{cal['seq_len']}; eval max_windows "
          f"{args.max_windows or recipe['eval']['perplexity'][0].get('max_windows')}")
    print(f"Machine: {platform.machine()}, {args.threads or 'default'} threads, python {platform.python_version()}; "
          "each mode in a fresh subprocess, one after the other\n")
    out = Path(tempfile.mkdtemp(prefix="lrcompress-scale-"))
    try:
        results = {mode: measure(mode, args, out) for mode in args.modes.split(",")}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("\n".join(table(results)))
    print(f"\nperplexity protocol: {next(iter(results.values()))['protocol']}")


if __name__ == "__main__":
    main()
