"""Where batch-1 decode time goes in a compressed checkpoint, against its dense original.

    python bench/decode_profile.py CHECKPOINT [CHECKPOINT ...] --dense MODEL [--repeats 5] [--profile]

For every checkpoint, in one process with the dense model loaded beside it:
- per module: one decode token (x of shape 1 × 1 × in) through each compressed module and through
  the dense model's linear of the same name, best of 7 × 50 calls, µs; summed over the modules
  (the linear work of one decoded token) and shown per shape;
- whole model: ``generate`` of ``--new-tokens`` greedy tokens after a 16-token prompt, dense and
  compressed alternating, median of ``--repeats``;
- with ``--profile``: the top ops by self CPU time of one generation of each (torch.profiler).

Threads: ``torch.set_num_threads(--threads)`` (1 thread for the numbers in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM

import lrcompress
from decode_layouts import best_us           # bench/ is on the path when this script runs
from lrcompress.modules import compressed_modules


def module_table(dense: torch.nn.Module, compressed: torch.nn.Module) -> None:
    dense_modules = dict(dense.named_modules())
    per_shape: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for name, module in compressed_modules(compressed):
        reference = dense_modules[name]
        x = torch.randn(1, 1, reference.in_features)
        per_shape[(module.kind, reference.out_features, reference.in_features, module.extra_repr())].append(
            (best_us(lambda: reference(x), n=50), best_us(lambda: module(x), n=50)))
    print("| kind | out × in | modules | dense µs | compressed µs | ratio (dense/compressed) |")
    print("|---|---|---|---|---|---|")
    total_dense = total_compressed = 0.0
    for (kind, out_f, in_f, _), times in per_shape.items():
        d = statistics.median(t[0] for t in times)
        c = statistics.median(t[1] for t in times)
        total_dense += sum(t[0] for t in times)
        total_compressed += sum(t[1] for t in times)
        print(f"| {kind} | {out_f} × {in_f} | {len(times)} | {d:.1f} | {c:.1f} | {d / c:.2f}× |")
    print(f"| all | | | {total_dense:.0f} | {total_compressed:.0f} | {total_dense / total_compressed:.2f}× |")


def decode(models: dict[str, torch.nn.Module], new_tokens: int, repeats: int) -> dict[str, float]:
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    def run(model):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    for model in models.values():
        run(model)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(repeats):
        for name in (list(models) if repeat % 2 == 0 else list(reversed(models))):
            started = time.perf_counter()
            run(models[name])
            seconds[name].append(time.perf_counter() - started)
    return {name: new_tokens / statistics.median(s) for name, s in seconds.items()}


def profile(model: torch.nn.Module, label: str, new_tokens: int, rows: int = 12) -> None:
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    print(f"\n{label}: top ops by self CPU time over {new_tokens} tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--dense", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-modules", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch 1")
    with torch.inference_mode():
        dense = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()
        for path in args.checkpoints:
            compressed = lrcompress.load(path)
            print(f"\n## {path}\n")
            if not args.skip_modules:
                module_table(dense, compressed)
            speeds = decode({"dense": dense, "compressed": compressed}, args.new_tokens, args.repeats)
            print(f"\ndecode {args.new_tokens} tokens: dense {speeds['dense']:.1f} tok/s, compressed "
                  f"{speeds['compressed']:.1f} tok/s, ratio {speeds['compressed'] / speeds['dense']:.2f}×")
            if args.profile:
                profile(dense, "dense", args.new_tokens)
                profile(compressed, "compressed", args.new_tokens)
            del compressed


if __name__ == "__main__":
    main()
