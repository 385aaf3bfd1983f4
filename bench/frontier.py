"""Issue 13 on a real model: the allocation × target table and the rate–distortion frontier, from run
directories that ``lrcompress compare`` reads.

    LRCOMPRESS_DATA=... python bench/frontier.py --model $LRCOMPRESS_SMOLLM2 --out runs/rd --rows ROW,ROW,...
    python bench/frontier.py --out runs/rd --table-only          # the tables from what is there
    python -m lrcompress compare runs/rd/<row> ... --output runs/rd/compare

Every row is one ``lrcompress run`` (its own process, one at a time, ``runtime.threads`` threads) writing
``--out/<row>`` (metrics.json, recipe.yaml, the checkpoint); a row whose metrics.json exists is not run
again, so the grid can be resumed or extended. Row names: ``whiten-0.2-global-original`` (method, ratio,
allocation, target), ``gptq3-layer`` / ``gptq3-original``, ``rtn4``, ``gptq3-eora32``, ``cospadi-0.2-uniform-layer``
(one K-SVD iteration: ``iterations: 1``). The first row run also evaluates the dense model (``eval.baseline``, cached), for the star
of the plot. The protocol is each recipe's own: 32 calibration windows of 512 (wiki.valid, seed 0), 40
WikiText-2 test windows of 512.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

LOW_RANK = re.compile(r"^(whiten|lord|cospadi)-(0\.\d+)-(uniform|spectrum|global)-(layer|original)$")
QUANT = re.compile(r"^(rtn|gptq)([348])(?:-(layer|original))?(?:-eora(\d+))?$")


def row_command(row: str) -> tuple[str, list[str]]:
    """The recipe and ``--set`` overrides of a row, from its name: a base name, then ``+``-joined options
    ``b<α>`` (runtime.target_blend) and ``ts`` / ``nots`` (runtime.true_sequential on / off)."""
    name, *options = row.split("+")
    recipe, sets = _base_command(name)
    for option in options:
        if option.startswith("b"):
            sets.append(f"runtime.target_blend={float(option[1:])}")
        elif option in ("ts", "nots"):
            sets.append(f"runtime.true_sequential={option == 'ts'}")
        else:
            raise SystemExit(f"unknown option {option!r} in row {row!r}")
    return recipe, sets


def _base_command(name: str) -> tuple[str, list[str]]:
    if match := LOW_RANK.match(name):
        method, ratio, allocation, target = match.groups()
        recipe = {"cospadi": "recipes/cospadi.yaml", "lord": "recipes/lord.yaml"}.get(method, "recipes/whiten.yaml")
        sets = [f"stages.0.ratio={ratio}", f"stages.0.allocation={allocation}", f"runtime.target={target}"]
        if method == "cospadi":
            sets.append("stages.0.iterations=1")
        return recipe, sets
    if match := QUANT.match(name):
        method, bits, target, eora = match.groups()
        if eora:
            return "recipes/eora-gptq.yaml", [f"stages.0.method={method}", f"stages.0.bits={bits}",
                                              f"stages.1.rank={eora}"] + ([f"runtime.target={target}"] if target else [])
        return f"recipes/{method}.yaml", [f"stages.0.bits={bits}"] + ([f"runtime.target={target}"] if target else [])
    raise SystemExit(f"unknown row {name!r}")


def run_lrcompress(directory: Path, recipe: str, sets: list[str]) -> None:
    """``lrcompress run RECIPE --output DIRECTORY --set ...`` in its own process, logged to DIRECTORY.log;
    nothing when DIRECTORY already holds a metrics.json."""
    if (directory / "metrics.json").is_file():
        return
    command = [sys.executable, "-m", "lrcompress", "run", recipe, "--output", str(directory), "--overwrite"]
    command += [arg for item in sets for arg in ("--set", item)]
    print("running", " ".join(command), flush=True)
    with open(directory.parent / f"{directory.name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def run_row(name: str, model: str, out: Path, threads: int, baseline: bool) -> None:
    recipe, sets = row_command(name)
    sets += [f"model.path={model}", f"runtime.threads={threads}"] + (["eval.baseline=true"] if baseline else [])
    run_lrcompress(out / name, recipe, sets)


def _kind(module_name: str) -> str:
    return module_name.split(".")[-1]


def table(out: Path) -> str:
    """Every finished row: perplexity, size, time, and per module kind the mean kept rank and mean error."""
    lines = ["| row | perplexity | MiB | targeted removed | compress s | allocation s | matching extra s |",
             "|---|---|---|---|---|---|---|"]
    kinds_rows = []
    for path in sorted(out.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        ppl = next(iter(m["eval"]["perplexity"].values()))["value"]
        c, timing = m["compression"], m.get("timing", {})
        size = (c.get("model_bytes_after") or 0) / 2**20
        extra = (m.get("output_matching") or {}).get("extra_seconds")
        lines.append(f"| {path.parent.name} | {ppl:.2f} | {size:.1f} | {100 * c['targeted_ratio']:.1f}% | "
                     f"{timing.get('compress', 0):.0f} | {timing.get('allocation', 0):.0f} | "
                     f"{'–' if extra is None else f'{extra:.0f}'} |")
        per_kind: dict[str, list[dict]] = defaultdict(list)
        for record in m.get("modules", []):
            if record.get("stage", 0) == 0:
                per_kind[_kind(record["name"])].append(record)
        kinds_rows.append((path.parent.name, per_kind))
    kinds = sorted({k for _, per_kind in kinds_rows for k in per_kind})
    lines += ["", "Mean kept rank / mean relative output error of the first stage, per module kind "
              "(the error is against the original model's outputs for target original):", "",
              "| row | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, per_kind in kinds_rows:
        cells = []
        for kind in kinds:
            records = per_kind.get(kind, [])
            ranks = [r["rank"] for r in records if r.get("rank")]
            error = sum(r["relative_error"] for r in records) / len(records) if records else None
            cells.append(("–" if not ranks else f"{sum(ranks) / len(ranks):.0f}") + " / "
                         + ("–" if error is None else f"{error:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _next_row(args, failed: set[str]) -> str | None:
    """The first row (of --rows, then of the --queue file as it is now) not finished and not failed."""
    rows = [r for r in args.rows.split(",") if r]
    if args.queue and args.queue.is_file():
        rows += [line.strip() for line in args.queue.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return next((r for r in rows if r not in failed and not (args.out / r / "metrics.json").is_file()), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("runs/rd"))
    parser.add_argument("--rows", default="", help="comma-separated row names (see the module docstring)")
    parser.add_argument("--queue", type=Path, help="a file of row names, one a line, re-read after every row "
                                                   "(rows can be added or reordered while the bench runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        args.out.mkdir(parents=True, exist_ok=True)
        failed: set[str] = set()
        while (name := _next_row(args, failed)) is not None:
            baseline = not any(args.out.glob("*/metrics.json"))
            try:
                run_row(name, args.model, args.out, args.threads, baseline)
            except subprocess.CalledProcessError:
                failed.add(name)
                print(f"{name}: failed (see {args.out / (name + '.log')})", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
