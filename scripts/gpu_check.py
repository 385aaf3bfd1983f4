"""The first-GPU check (issue 31): every GPU measurement this project wants, in one JSON, in under 8 minutes.

    .venv-gpu/bin/python scripts/gpu_check.py [--out gpu_check.json] [--model models/smollm2-135m]
                                              [--budget 420] [--only STEP,...] [--plan]

``scripts/gpu_check.sh`` makes the environment (a venv with a CUDA torch) and calls this. The steps, in
order, each a subprocess with its own time limit (``STEPS``), its log kept in the JSON (last lines):

1. ``cuda_tests``: the tests that take the CUDA paths (Triton kernels dispatched on CUDA tensors, the
   quantized and compressed modules on the device, out-of-memory naming), *not* the Triton interpreter;
2. ``cost_rates``: bench/cost_constants.py on CUDA — the JSON's ``rates.cuda`` replaces the cost model's
   estimated GPU constants (``LRCOMPRESS_COST_RATES=<this JSON>``, ``lrcompress.pipeline.costs``);
3. ``quantized_kernel`` and ``sparse_dict_kernel``: the two kernel benches (bench/);
4. ``whiten`` and ``cospadi``: ``lrcompress run`` on the first ``--layers`` decoder layers of SmolLM2-135M
   on CUDA, 8 × 512 calibration windows, the compress phase's time and peak CUDA memory from metrics.json.

A step that fails or runs out of time is recorded (exit code, seconds, log tail) and the next one runs;
steps that would start past ``--budget`` seconds are skipped and recorded as such. Without CUDA nothing
runs: the JSON says ``skipped`` with the reason and the script exits 0 (so that it is safe anywhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAIL = 3000                                   # characters of each step's output kept in the JSON


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    timeout: int
    result: str | None = None                 # a JSON file the step writes, folded into the report


def steps(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps for these arguments (``work``: where steps write their own files)."""
    py = sys.executable
    layers = f"re:model\\.layers\\.[0-{args.layers - 1}]\\..*"
    common = ["--set", "runtime.device=cuda", "--set", "calibration.num_samples=8",
              "--set", "calibration.seq_len=512", "--set", f"stages.0.targets=['{layers}']",
              "--set", "eval={perplexity: [{dataset: wikitext2, split: test, seq_len: 512, max_windows: 4}]}",
              "--set", f"model.path={args.model}"]
    run = [py, "-m", "lrcompress", "run"]
    return [
        Step("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/triton_kernels/test_dispatch.py",
                            "tests/modules/test_quantized_device.py", "tests/compressor/test_device.py",
                            "tests/pipeline/test_oom.py"], 90),
        Step("cost_rates", [py, "bench/cost_constants.py", "--device", "cuda", "--json", str(work / "rates.json")],
             70, str(work / "rates.json")),
        Step("quantized_kernel", [py, "bench/quantized_kernel.py"], 40),
        Step("sparse_dict_kernel", [py, "bench/sparse_dict_kernel.py", "--json", str(work / "sparse.json")], 40,
             str(work / "sparse.json")),
        Step("whiten", run + ["recipes/whiten.yaml", *common, "--output", str(work / "whiten"), "--overwrite"], 70,
             str(work / "whiten" / "metrics.json")),
        Step("cospadi", run + ["recipes/cospadi.yaml", *common, "--output", str(work / "cospadi"), "--overwrite"],
             100, str(work / "cospadi" / "metrics.json")),
    ]


def cuda_status() -> tuple[bool, str]:
    """(available, why not / which device), asked in a subprocess so that this process never imports torch."""
    probe = ("import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "
             "'NO: torch ' + torch.__version__ + ' sees no CUDA device')")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"could not ask torch: {error}"
    errors = done.stderr.strip().splitlines()
    text = done.stdout.strip() or (errors[-1] if errors else "no answer")
    return (done.returncode == 0 and not text.startswith("NO:")), text.removeprefix("NO: ")


def run_step(step: Step, env: dict[str, str]) -> dict:
    """Run one step; its exit code, seconds, output tail and (when it wrote one) its JSON."""
    started = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:      # its output comes as bytes even with text=True
        code, output = "timeout", "".join(_text(part) for part in (error.stdout, error.stderr))
    record = {"command": " ".join(step.command), "exit": code, "seconds": round(time.perf_counter() - started, 2),
              "output_tail": output[-TAIL:]}
    if step.result and Path(step.result).is_file():
        record["result"] = json.loads(Path(step.result).read_text())
    return record


def _text(part: bytes | str | None) -> str:
    return part.decode(errors="replace") if isinstance(part, bytes) else (part or "")


def assemble(status: str, device: str, records: dict[str, dict]) -> dict:
    """The one JSON: status, device, every step's record, and ``rates`` (from the cost_rates step) at the top
    level, where ``LRCOMPRESS_COST_RATES`` reads it; the compress runs' phase times and peak memory pulled out
    of their metrics.json under ``compress``."""
    report: dict = {"status": status, "device": device, "machine": platform.node(), "steps": records}
    rates = (records.get("cost_rates", {}).get("result") or {}).get("rates")
    if rates:
        report["rates"] = rates
    compress = {}
    for name in ("whiten", "cospadi"):
        metrics = records.get(name, {}).get("result")
        if metrics:
            compress[name] = {"timing": metrics.get("timing"), "memory": metrics.get("memory")}
    if compress:
        report["compress"] = compress
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON written")
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2", "models/smollm2-135m"))
    parser.add_argument("--layers", type=int, default=4, help="first decoder layers compressed by whiten/cospadi (1-10)")
    parser.add_argument("--budget", type=int, default=420, help="seconds for the steps (the install comes before): a step that could end later is skipped")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    parser.add_argument("--plan", action="store_true", help="print the steps and exit (runs nothing)")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= 10:
        parser.error("--layers must be between 1 and 10 (a few layers: the check has 8 minutes)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    work = out.with_suffix(".d")
    chosen = steps(args, work)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {s.name for s in chosen}
        if unknown:
            print(f"gpu_check: unknown steps {sorted(unknown)}; known: {[s.name for s in chosen]}", file=sys.stderr)
            return 2
        chosen = [s for s in chosen if s.name in names]
    if args.plan:
        for step in chosen:
            print(f"{step.name} ({step.timeout} s): {' '.join(step.command)}")
        return 0
    available, device = cuda_status()
    if not available:
        print(f"gpu_check: skipped, no CUDA device ({device}); nothing was run")
        out.write_text(json.dumps(assemble("skipped", device, {}), indent=2))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)         # the real kernels, not the interpreter
    started, records = time.perf_counter(), {}
    for step in chosen:
        if time.perf_counter() - started + step.timeout > args.budget:
            records[step.name] = {"exit": "skipped", "reason": f"would pass the {args.budget} s budget"}
            continue
        print(f"gpu_check: {step.name} ...", flush=True)
        records[step.name] = run_step(step, env)
        print(f"gpu_check: {step.name} exit {records[step.name]['exit']} in {records[step.name]['seconds']} s",
              flush=True)
        out.write_text(json.dumps(assemble("partial", device, records), indent=2))   # survives a kill
    failed = [name for name, r in records.items() if r.get("exit") not in (0, "skipped")]
    out.write_text(json.dumps(assemble("failed: " + ",".join(failed) if failed else "ok", device, records), indent=2))
    print(f"gpu_check: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
