"""Measure the cost model's constants (``lrcompress.pipeline.costs.Rates``) on this machine's CPU or GPU.

    python bench/cost_constants.py [--device cpu|cuda] [--threads 1] [--json rates.json] [--quick]
    python bench/cost_constants.py --check [--json check.json]     # modules compressed vs the cost model
    python bench/cost_constants.py --dict-check q_proj,gate_proj [--columns 128 --atoms 64] --json dict.json
    python bench/cost_constants.py --dict-table dict.json [...]     # cospadi/compot on 8B shapes vs the model

Each constant is a time per unit of work, fitted as the median over a few sizes (the units make the
constants size-independent to first order: a GEMM's flops, m·n·min(m, n) for an SVD, n³ for Cholesky,
triangular inverse and eigh). The JSON is in the format ``LRCOMPRESS_COST_RATES`` reads: ``{"rates":
{"<device>": {...}}}``. ``scripts/gpu_check.sh`` runs it on CUDA; the CPU values in
``lrcompress/pipeline/costs.py`` came from it (one thread, this project's 2-core development machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(device: torch.device, fn, repeats: int = 2) -> float:
    """Median seconds of ``fn`` after one warm-up call (synchronized on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def spd(n: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(n, n, dtype=torch.float64, device=device)
    return x @ x.T + n * torch.eye(n, dtype=torch.float64, device=device)


def measure(device: torch.device, quick: bool) -> dict[str, float]:
    """Every constant of ``Rates`` except the process baseline (see ``process_bytes``)."""
    big = device.type == "cuda"
    sizes = [1024, 2048] if quick or not big else [2048, 4096]
    out: dict[str, float] = {}
    for name, dtype in (("gemm_float32", torch.float32), ("gemm_float64", torch.float64),
                        ("gemm_bfloat16", torch.bfloat16)):
        rates = []
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
            rates.append(2 * n**3 / timed(device, lambda: a @ b))
        out[name] = statistics.median(rates)
    svd, chol, tri, eig = [], [], [], []
    for n in sizes:
        a = torch.randn(n // 2, n * 3 // 2, dtype=torch.float64, device=device)
        svd.append(timed(device, lambda: torch.linalg.svd(a, full_matrices=False), 1) / ((n // 2) ** 2 * (n * 3 // 2)))
        g = spd(n, device)
        eye = torch.eye(n, dtype=torch.float64, device=device)
        factor = torch.linalg.cholesky(g)
        chol.append(timed(device, lambda: torch.linalg.cholesky_ex(g)) / n**3)
        tri.append(timed(device, lambda: torch.linalg.solve_triangular(factor, eye, upper=False)) / n**3)
        eig.append(timed(device, lambda: torch.linalg.eigh(g), 1) / n**3)
    out.update(svd=statistics.median(svd), cholesky=statistics.median(chol), triangular=statistics.median(tri),
               eigh=statistics.median(eig))
    out.update(gptq_columns(device))
    out["forward_float32"] = forward_rate(device, torch.float32)
    if big:
        out["forward_bfloat16"] = forward_rate(device, torch.bfloat16)
    out["read"] = read_rate()
    return out


def gptq_columns(device: torch.device) -> dict[str, float]:
    """GPTQ's column loop: time per column = a + b·m (m the output rows), fitted from two widths, with the
    one-off factorizations subtracted (the loop is what the other constants do not cover)."""
    from lrcompress.compressor.gptq import gptq_quantize

    n, per = 512, {}
    for m in (256, 2048):
        w = torch.randn(m, n, dtype=torch.float64, device=device)
        g = spd(n, device)
        per[m] = timed(device, lambda: gptq_quantize(w, g, 4, 128, "float16"), 1) / n
    slope = max((per[2048] - per[256]) / (2048 - 256), 0.0)
    return {"gptq_column": max(per[256] - slope * 256, 0.0), "gptq_column_row": slope}


def forward_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Flops per second of a Llama decoder layer's forward (2·params + attention per token)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=1024, intermediate_size=3584, num_attention_heads=16, num_key_value_heads=4)
    layer = LlamaDecoderLayer(config, 0).to(device=device, dtype=dtype).eval()
    batch, seq = 4, 512
    x = torch.randn(batch, seq, 1024, dtype=dtype, device=device)
    position = torch.arange(seq, device=device)[None].expand(batch, -1)
    rotary = LlamaRotaryEmbedding(config).to(device)
    embeddings = tuple(t.to(dtype) for t in rotary(x, position))
    mask = torch.full((seq, seq), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]
    params = sum(p.numel() for p in layer.parameters())
    flops = batch * seq * (2 * params + 4 * seq * 1024)
    with torch.no_grad():
        return flops / timed(device, lambda: layer(x, attention_mask=mask, position_embeddings=embeddings))


def read_rate() -> float:
    """Bytes per second of reading a safetensors shard and widening bf16 to float32 (page cache cold only if
    the file was just written and evicted: this is the warm figure, an upper bound)."""
    from safetensors.torch import save_file

    from lrcompress.checkpoint.shards import read_tensors

    tensor = torch.randn(4096, 8192).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "x.safetensors"
        save_file({"w": tensor}, path)
        seconds = timed(torch.device("cpu"), lambda: read_tensors(path, ["w"])["w"].to(torch.float32))
    return tensor.numel() * 2 / seconds


def check_modules(shapes: list[tuple[int, int]]) -> list[dict]:
    """Each method's real compression of one random m×n module (Gram of 2048 random rows), plus the output-error
    measure the pipeline adds, against the cost model: seconds vs ``method_seconds`` and the resident set's
    growth (sampled, ``PeakMemory``) vs ``workspace_bytes``, on this device's built-in or loaded rates."""
    from torch import nn

    from lrcompress.compressor import GramStatistic, get_compressor
    from lrcompress.compressor.linalg import relative_output_error
    from lrcompress.pipeline.costs import load_rates, method_seconds, workspace_bytes
    from lrcompress.pipeline.memory import PeakMemory
    from lrcompress.pipeline.plan import PlannedModule

    rates = load_rates("cpu").scaled(torch.get_num_threads())
    rows = []
    for m, n in shapes:
        linear = nn.Linear(n, m, bias=False)
        gram = GramStatistic(n)
        gram.observe(torch.randn(2048, n), None)
        for method, options in (("whiten", {"ratio": 0.2}), ("gptq", {"bits": 4, "group_size": 128}),
                                ("rtn", {"bits": 4, "group_size": 128})):
            cls = get_compressor(method)
            compressor = cls(cls.Config(**options))
            started = time.perf_counter()
            with PeakMemory(torch.device("cpu")) as peak:
                result = compressor.compress("x", linear, {"gram": gram})
                relative_output_error(linear.weight.detach(), result.module.dense_weight().detach(), gram.gram("x"))
            seconds = time.perf_counter() - started
            planned = PlannedModule("x", 0, method, m, n, 0, 0, result.rank)
            growth = peak.report()["peak_memory_growth_bytes"] or 0
            rows.append({"method": method, "m": m, "n": n, "seconds": seconds,
                         "predicted_seconds": method_seconds(method, planned, rates), "growth_bytes": growth,
                         "predicted_bytes": workspace_bytes(method, planned)})
            print(f"{method:7} {m}×{n}: {seconds:6.2f} s (predicted {rows[-1]['predicted_seconds']:6.2f}), "
                  f"{growth / 2**20:6.0f} MiB (predicted {rows[-1]['predicted_bytes'] / 2**20:6.0f})", flush=True)
    return rows


DICT_SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336),
               "smoke": (384, 256)}    # Llama-3-8B's shape classes (m × n); smoke: a quick try of the script
RUN_ITERATIONS = 2     # K-SVD's first sparse coding is the SVD start's orthonormal shortcut: the second is OMP
DICT_DEFAULTS = {"cospadi": {"ratio": 0.2, "iterations": 4}, "compot": {"ratio": 0.2, "iterations": 20}}


class StageClock:
    """Wall time per stage of one cospadi/compot compression, with the loops too long to run whole on this
    machine run on a sample and scaled: the K-SVD atom updates (every ``stride``-th atom), the batched OMP and
    the value refit (the first ``columns`` columns; the sample's output is tiled to the full width, which
    changes the result, never the cost of the stages that follow). Everything else runs in full."""

    def __init__(self, atoms: int, columns: int) -> None:
        self.atoms, self.columns = atoms, columns
        self.seconds: dict[str, float] = {}
        self.scaled: dict[str, float] = {}
        self.marks: list[float] = []
        self.calls: dict[str, list[float]] = {}
        self.learn_started = 0.0
        self.borrowed = 0.0          # seconds of a result computed for the other method (the shared whitening)

    def add(self, stage: str, seconds: float, scale: float = 1.0) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.scaled[stage] = self.scaled.get(stage, 0.0) + seconds * scale
        self.calls.setdefault(stage, []).append(seconds * scale)

    def timed(self, stage: str, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            self.add(stage, time.perf_counter() - started)
            return result
        return wrapper

    def sampled_columns(self, stage: str, fn, at: int):
        """``fn``'s column-wise work on the first ``columns`` columns of its tensor arguments from ``at`` on
        (each · × N), scaled to N."""
        def wrapper(*args):
            full = args[at].shape[1]
            take = min(self.columns, full)
            cut = [a[:, :take] if isinstance(a, torch.Tensor) else a for a in args[at:]]
            started = time.perf_counter()
            outputs = fn(*args[:at], *cut)
            self.add(stage, time.perf_counter() - started, full / take)
            reps = -(-full // take)
            tile = [o.repeat(1, reps)[:, :full] if isinstance(o, torch.Tensor) else o for o in outputs]
            return tuple(tile) if isinstance(outputs, tuple) else tile
        return wrapper

    def sampled_atoms(self, update_atom):
        def wrapper(dictionary, codes, residual, power_steps):
            k = dictionary.shape[1]
            chosen = range(0, k, max(1, k // self.atoms))
            started = time.perf_counter()
            unused = [j for j in chosen if not update_atom(dictionary, codes, residual, j, power_steps)]
            self.add("atom updates", time.perf_counter() - started, k / len(chosen))
            return unused
        return wrapper


def dict_check(names: list[str], atoms: int, columns: int) -> list[dict]:
    """cospadi and compot (the recipe defaults: ratio 0.2, ρ = 2, 4 K-SVD iterations / 20 alternations) on one
    random module of each Llama-3-8B shape class, Gram of 2048 random rows (rank 2048, as 4 × 512 calibration
    tokens give), one K-SVD iteration / one alternation run and the rest extrapolated, against the cost model."""
    from unittest import mock

    from torch import nn

    from lrcompress.compressor import GramStatistic, cospadi, dictionary, get_compressor
    from lrcompress.compressor.linalg import relative_output_error
    from lrcompress.pipeline.costs import load_rates, method_seconds, workspace_bytes
    from lrcompress.pipeline.memory import PeakMemory
    from lrcompress.pipeline.plan import PlannedModule

    rates = load_rates("cpu")
    rows = []
    for name in names:
        m, n = DICT_SHAPES[name]
        linear = nn.Linear(n, m, bias=False)
        gram = GramStatistic(n)
        gram.observe(torch.randn(2048, n), None)
        started = time.perf_counter()
        relative_output_error(linear.weight.detach(), linear.weight.detach() * 0.9, gram.gram("x"))
        measure = time.perf_counter() - started
        whitened: dict = {}                 # both methods whiten the same Gram: computed once, its time charged to each
        for method, defaults in DICT_DEFAULTS.items():
            clock = StageClock(atoms, columns)
            cls = get_compressor(method)
            compressor = cls(cls.Config(**{**defaults, "iterations": RUN_ITERATIONS, "tolerance": 0.0}))
            patches = [mock.patch.object(cospadi, "whitening", _once(clock, whitened, cospadi.whitening)),
                       mock.patch.object(cospadi, "refit_values", clock.sampled_columns("refit", cospadi.refit_values, 1)),
                       mock.patch.object(dictionary, "initial_dictionary",
                                         clock.timed("initial SVD", dictionary.initial_dictionary)),
                       mock.patch.object(dictionary, "batched_omp", clock.sampled_columns("OMP", dictionary.batched_omp, 1)),
                       mock.patch.object(dictionary, "_update_atoms", clock.sampled_atoms(dictionary.update_atom)),
                       mock.patch.object(dictionary, "dense_codes", _marking(clock, dictionary.dense_codes))]
            learn = cls.learn
            for patch in patches:
                patch.start()
            try:
                def timed_learn(self, *a):
                    clock.learn_started = time.perf_counter()
                    return clock.timed("learn", learn)(self, *a)

                with mock.patch.object(cls, "learn", timed_learn), \
                        PeakMemory(torch.device("cpu")) as peak:
                    started = time.perf_counter()
                    result = compressor.compress("x", linear, {"gram": gram})
                    seconds = time.perf_counter() - started
            finally:
                for patch in patches:
                    patch.stop()
            rows.append(_dict_row(name, method, m, n, seconds, measure, clock, defaults["iterations"], result,
                                  peak.report()["peak_memory_growth_bytes"] or 0))
            planned = PlannedModule("x", 0, method, m, n, 0, 0, None)
            rows[-1].update(predicted_seconds=method_seconds(method, planned, rates),
                            predicted_bytes=workspace_bytes(method, planned))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def dict_table(paths: list[str]) -> None:
    """``--dict-check`` results against the committed cost model: seconds (extrapolated) and the resident
    set's growth (plus the whitening computed for the other method, which compot's run borrows)."""
    from lrcompress.pipeline.costs import load_rates, method_seconds, workspace_bytes
    from lrcompress.pipeline.plan import PlannedModule

    rates = load_rates("cpu")
    print("| module | method | s, k | seconds run | seconds extrapolated | predicted | ratio | MiB | predicted MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        rows = json.loads(Path(path).read_text())["dict_check"]
        for r in rows:
            m, n = r["m"], r["n"]
            planned = PlannedModule("x", 0, r["method"], m, n, m * n, 0, None)     # ratio 0.2: the default
            seconds, memory = method_seconds(r["method"], planned, rates), workspace_bytes(r["method"], planned)
            growth = r["growth_bytes"] + (2 * n * n * 8 if r["method"] == "compot" else 0)
            print(f"| {r['shape']} {m}×{n} | {r['method']} | {r['sparsity']}, {r['atoms']} | {r['run_seconds']:.0f} | "
                  f"{r['extrapolated_seconds']:.0f} | {seconds:.0f} | {r['extrapolated_seconds'] / seconds:.2f} | "
                  f"{growth / 2**20:.0f} | {memory / 2**20:.0f} | {growth / memory:.2f} |")


def _once(clock: StageClock, cache: dict, whitening):
    def wrapper(*args):
        if "result" in cache:
            clock.borrowed += cache["seconds"]
        else:
            started = time.perf_counter()
            cache["result"] = whitening(*args)
            cache["seconds"] = time.perf_counter() - started
        clock.add("whitening", cache["seconds"])
        return cache["result"]
    return wrapper


def _marking(clock: StageClock, dense_codes):
    def wrapper(*args):
        clock.marks.append(time.perf_counter())
        return dense_codes(*args)
    return wrapper


def _dict_row(name: str, method: str, m: int, n: int, seconds: float, measure: float, clock: StageClock,
              iterations: int, result, growth: int) -> dict:
    """One compression's stages, and its full cost: the sampled loops scaled, the two iterations run, the
    second one (K-SVD: the first runs OMP's orthonormal shortcut on the SVD start) × the rest of the default
    count (cospadi's tolerance may stop K-SVD earlier: an upper bound), plus the output-error measure."""
    s, scaled = clock.seconds, clock.scaled
    extra = sum(scaled[k] - s[k] for k in ("OMP", "atom updates") if k in s)
    learn = s["learn"] + extra                          # the two iterations at full size
    init = s.get("initial SVD", 0.0) if method == "cospadi" else clock.marks[0] - clock.learn_started
    if method == "cospadi":
        omp = clock.calls.get("OMP", [0.0, 0.0])
        iteration = (learn - init + omp[-1] - omp[0]) / 2
    else:
        iteration = (learn - init) / RUN_ITERATIONS
    refit = scaled.get("refit", 0.0) - s.get("refit", 0.0)
    outside = seconds - s["learn"] + refit + clock.borrowed     # whitening, un-whitening, the refit (scaled), ...
    full = outside + learn + (iterations - RUN_ITERATIONS) * iteration + measure
    return {"shape": name, "method": method, "m": m, "n": n, "run_seconds": seconds, "stages": s,
            "stages_scaled": scaled, "calls": clock.calls, "initial_svd": init, "iteration": iteration,
            "iterations": iterations, "measure": measure, "extrapolated_seconds": full, "growth_bytes": growth,
            "atoms": result.details["atoms"], "sparsity": result.details["sparsity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--json", default=None, help="write {'rates': {device: constants}} here")
    parser.add_argument("--check", action="store_true",
                        help="instead: compress 1024×3584, 3584×1024 and 2048×2048 modules with whiten, gptq, rtn "
                             "and compare time and memory with the cost model (CPU)")
    parser.add_argument("--dict-check", default=None, metavar="SHAPES",
                        help="instead: cospadi and compot on these comma-separated Llama-3-8B shape classes "
                             f"({', '.join(DICT_SHAPES)}), sampled and extrapolated (dict_check), vs the cost model")
    parser.add_argument("--atoms", type=int, default=64, help="dict-check: K-SVD atoms updated (the rest scaled)")
    parser.add_argument("--columns", type=int, default=512, help="dict-check: OMP and refit columns run")
    parser.add_argument("--dict-table", nargs="+", default=None, metavar="JSON",
                        help="instead: the --dict-check results against the cost model, as a table")
    args = parser.parse_args()
    if args.dict_table:
        dict_table(args.dict_table)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.dict_check:
        rows = dict_check(args.dict_check.split(","), args.atoms, args.columns)
        if args.json:
            Path(args.json).write_text(json.dumps({"dict_check": rows, "load": os.getloadavg()}, indent=2))
        return
    if args.check:
        rows = check_modules([(1024, 3584), (3584, 1024), (2048, 2048)])
        if args.json:
            Path(args.json).write_text(json.dumps({"check": rows, "load": os.getloadavg()}, indent=2))
        return
    device = torch.device(args.device)
    rates = measure(device, args.quick)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    rates["threads"] = args.threads
    result = {"rates": {args.device: rates}, "device_name": label, "load": os.getloadavg()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
