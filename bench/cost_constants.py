"""Measure the cost model's constants (``lrcompress.pipeline.costs.Rates``) on this machine's CPU or GPU.

    python bench/cost_constants.py [--device cpu|cuda] [--threads 1] [--json rates.json] [--quick]
    python bench/cost_constants.py --check [--json check.json]     # modules compressed vs the cost model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--json", default=None, help="write {'rates': {device: constants}} here")
    parser.add_argument("--check", action="store_true",
                        help="instead: compress 1024×3584, 3584×1024 and 2048×2048 modules with whiten, gptq, rtn "
                             "and compare time and memory with the cost model (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
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
