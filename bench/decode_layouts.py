"""Weight layouts and kernels for one decode token (batch 1) on CPU, on SmolLM2-135M's linear shapes.

    python bench/decode_layouts.py cold [--layers 30]    # one decode step over all layers' linears
    python bench/decode_layouts.py hot                   # one linear at a time, weight in cache

``cold``: a decode step through ``--layers`` layers × SmolLM2's seven linear shapes (q, k, v, o, gate,
up, down), each with its own random weight, so every weight streams from memory as in a real model;
median of 9 steps, layouts interleaved. ``hot``: each shape alone, the same weight called 200 times
(best of 7) — kernel and per-call overhead without the memory traffic. Random weights and codes: speed
does not depend on the values. Low-rank at ratio 0.3 (r = 0.7·in·out/(in + out)); sparse dictionary
at ratio 0.2 with k = 2s atoms and 9-bit indices (s from the same budget as ``cospadi``'s plan).
Threads: 1 (``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
to_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu


def low_rank(n: int, k: int) -> int:
    return int(0.7 * n * k / (n + k))


def dictionary_sparsity(n: int, k: int) -> int:
    """s with D (k × 2s) + s values and s 9-bit indices per output = 0.8 of the dense values."""
    return int(0.8 * n * k / (2 * k + n * (1 + 9 / 32)))


def int4_weight(n: int, k: int, group: int = 64) -> tuple:
    return to_int4(torch.randint(0, 16, (n, k), dtype=torch.int32), 1), torch.rand(k // group, n, 2).bfloat16()


def layout(kind: str, n: int, k: int) -> tuple[tuple, Callable]:
    """(tensors, forward(x, tensors)) of one linear n × k in ``kind``'s layout."""
    r, s = low_rank(n, k), dictionary_sparsity(n, k)
    if kind == "dense":                        # nn.Linear: W row-major, F.linear reads Wᵀ transposed
        return (torch.randn(n, k),), lambda x, t: F.linear(x, t[0])
    if kind == "dense, column-major W":
        return (torch.randn(k, n),), lambda x, t: x @ t[0]
    if kind == "low-rank 0.3, row-major":
        return (torch.randn(r, k), torch.randn(n, r)), lambda x, t: F.linear(F.linear(x, t[0]), t[1])
    if kind == "low-rank 0.3, rank padded to 16":
        rp = -(-r // 16) * 16
        return (torch.randn(rp, k), torch.randn(n, rp)), lambda x, t: F.linear(F.linear(x, t[0]), t[1])
    if kind == "low-rank 0.3, column-major":
        return (torch.randn(k, r), torch.randn(r, n)), lambda x, t: (x @ t[0]) @ t[1]
    if kind == "int4 kernel (4-bit)":
        return int4_weight(n, k), lambda x, t: int4_mm(x.bfloat16(), t[0], 64, t[1]).float()
    if kind == "int4 kernel, two planes (8-bit)":
        def two_planes(x, t):
            low = x.bfloat16()
            return int4_mm(torch.cat([low, low], 1), t[0], 64, t[1]).float()
        return int4_weight(n, 2 * k), two_planes
    if kind == "sparse dict 0.2, S dense":
        return (torch.randn(k, 2 * s), torch.randn(2 * s, n)), lambda x, t: (x @ t[0]) @ t[1]
    raise ValueError(kind)


KINDS = ["dense", "dense, column-major W", "low-rank 0.3, row-major", "low-rank 0.3, rank padded to 16",
         "low-rank 0.3, column-major", "int4 kernel (4-bit)", "int4 kernel, two planes (8-bit)",
         "sparse dict 0.2, S dense"]


def cold(layers: int) -> None:
    xs = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
    built = {kind: [[layout(kind, n, k) for n, k in SHAPES] for _ in range(layers)] for kind in KINDS}

    def step(kind: str) -> float:
        started = time.perf_counter()
        for modules in built[kind]:
            for (tensors, forward), (_, k) in zip(modules, SHAPES):
                forward(xs[k], tensors)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for kind in KINDS:
        step(kind)
    for repeat in range(9):
        for kind in (KINDS if repeat % 2 == 0 else KINDS[::-1]):
            times[kind].append(step(kind))
    dense = statistics.median(times["dense"])
    print(f"decode step over {layers} layers × {len(SHAPES)} linears, median of 9, 1 thread\n")
    print("| layout | MiB streamed | ms per step | GiB/s | × dense |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        size = sum(t.numel() * t.element_size() for modules in built[kind] for tensors, _ in modules for t in tensors)
        ms = statistics.median(times[kind])
        print(f"| {kind} | {size / 2**20:.0f} | {ms * 1e3:.1f} | {size / 2**30 / ms:.1f} | {dense / ms:.2f}× |")


def best_us(call: Callable, n: int = 200, reps: int = 7) -> float:
    call()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - started) / n)
    return best * 1e6


def hot() -> None:
    print("one linear, x of one token, best of 7 × 200 calls, µs, 1 thread\n")
    print("| out × in | " + " | ".join(KINDS) + " | cast x→bf16 | cast y→fp32 | F.pad x by 64 |")
    print("|---|" + "---|" * (len(KINDS) + 3))
    for n, k in sorted(set(SHAPES), key=SHAPES.index):
        x = torch.randn(1, k)
        cells = []
        for kind in KINDS:
            tensors, forward = layout(kind, n, k)
            cells.append(best_us(lambda: forward(x, tensors)))
        y = torch.randn(1, n).bfloat16()
        cells += [best_us(lambda: x.bfloat16()), best_us(lambda: y.float()), best_us(lambda: F.pad(x, (0, 64)))]
        print(f"| {n} × {k} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["cold", "hot"])
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with torch.inference_mode():
        cold(args.layers) if args.mode == "cold" else hot()


if __name__ == "__main__":
    main()
