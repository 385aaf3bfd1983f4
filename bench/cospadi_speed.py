"""Whole-model CoSpaDi against whiten, side by side in one invocation: time per phase, perplexity, bytes.

    python bench/cospadi_speed.py [--model models/smollm2-135m] [--dtype float32] [--ratios 0.2]
                                  [--configs whiten,cospadi:4,cospadi:1] [--num-samples 32]
                                  [--max-windows 40] [--threads 1] [--no-save] [--layers 0-1]

The Grams of all decoder-layer linears are collected once from the uncompressed model (the protocol of
``bench/cospadi.py``) and every row compresses the same model from them through the compressor
contract, so the rows differ only in the method. A config is ``whiten`` or
``cospadi:ITERATIONS[:KSVD_DTYPE]`` or ``compot:ITERATIONS``. Each compression is timed per phase (whitening, SVD
initialization, sparse coding, atom updates, value refit; the functions ``bench/cospadi_phases.py``
wraps) and in total; "× whiten" divides by the whiten row of the same ratio. The compressed model is
then evaluated (WikiText-2 test perplexity) and written as a checkpoint to a temporary directory to
report its bytes on disk (``--no-save`` skips that), then the dense modules are restored.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from lrcompress.checkpoint import bytes_on_disk
from lrcompress.checkpoint.writer import write_checkpoint
from lrcompress.data import calibration_windows, data_dir, load_text, tokenize
from lrcompress.eval import EvalContext, perplexity
from lrcompress.models import load_model
from lrcompress.recipe import PerplexitySpec

from cospadi import compress_all, restore, target_names
from cospadi_phases import PHASES, instrument, parse
from grams import collect_grams


def checkpoint_bytes(model, tokenizer) -> int:
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(model, tokenizer, Path(directory), {"bench": "cospadi_speed"})
        return bytes_on_disk(Path(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--dtype", default="float32", help="dtype the model is loaded (and stored) in")
    parser.add_argument("--ratios", default="0.2")
    parser.add_argument("--configs", default="whiten,cospadi:4,cospadi:1")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-save", action="store_true", help="do not write checkpoints for their bytes")
    parser.add_argument("--layers", default=None, help="only decoder layers FIRST-LAST (a smoke test; e.g. 0-1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = data_dir(None, None)
    loaded = load_model(args.model, args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    dense_bytes = None if args.no_save else checkpoint_bytes(model, tokenizer)
    windows = calibration_windows(tokenize(tokenizer, load_text("wikitext2", "validation", directory).text),
                                  args.num_samples, 512, 0)
    layers = None
    if args.layers:
        first, last = (int(v) for v in args.layers.split("-"))
        layers = range(first, last + 1)
    names = target_names(model, layers)
    started = time.perf_counter()
    stats = {n: {"gram": gram} for n, gram in collect_grams(model, names, windows, 4).items()}
    gram_seconds = time.perf_counter() - started
    print(f"grams of {len(names)} modules from {len(windows)} windows in {gram_seconds:.0f}s", file=sys.stderr,
          flush=True)
    seconds: dict[str, float] = defaultdict(float)
    instrument(seconds)
    rows = []
    protocol = ""
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for config in args.configs.split(","):
            method, options = parse(config)
            seconds.clear()
            result = compress_all(model, names, stats, method, {"ratio": ratio, **options})
            split = dict(seconds)
            stopped = sum(1 for d in result["details"] if d.get("ksvd_stopped_early"))
            ppl = perplexity(model, tokenizer, PerplexitySpec(max_windows=args.max_windows), EvalContext(directory))
            protocol = ppl.protocol
            size = None if args.no_save else checkpoint_bytes(model, tokenizer)
            restore(model, result["originals"])
            rows.append((config, ratio, result, split, ppl.value, size, stopped))
            print(f"{config} {ratio}: compress {result['seconds']:.0f}s {({k: round(v, 1) for k, v in split.items()})}, "
                  f"ppl {ppl.value:.3f}, bytes {size}, ratio {result['ratio']:.3f}, mean rel. error "
                  f"{result['mean_error']:.4f}, stopped early {stopped}", file=sys.stderr, flush=True)
    print(f"\nModel {args.model} loaded in {args.dtype}; {len(names)} decoder-layer linears; Grams from the uncompressed "
          f"model over {args.num_samples}×512 wikitext2/validation windows (seed 0) in {gram_seconds:.0f} s, shared by "
          f"every row; perplexity: {protocol}")
    print(f"Machine: {platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}"
          + (f"; dense checkpoint {dense_bytes:,} bytes" if dense_bytes else "") + "\n")
    phases = list(dict.fromkeys(p for p, _, _ in PHASES))
    whiten = {ratio: result["seconds"] for config, ratio, result, *_ in rows if config == "whiten"}
    print("| config | ratio | " + " | ".join(phases) + " | compress s | × whiten | with Grams: s | × whiten |")
    print("|---|---|" + "---|" * (len(phases) + 4))
    for config, ratio, result, split, *_ in rows:
        total = result["seconds"]
        base = whiten.get(ratio)
        times = f"{total / base:.1f}×" if base else "–"
        whole = f"{(total + gram_seconds) / (base + gram_seconds):.1f}×" if base else "–"
        print(f"| {config} | {ratio:.1f} | " + " | ".join(f"{split.get(p, 0.0):.1f}" for p in phases)
              + f" | {total:.0f} | {times} | {total + gram_seconds:.0f} | {whole} |")
    print("\n| config | ratio | targeted ratio (w/o indices) | mean rel. output error | perplexity | bytes on disk "
          "| K-SVD stopped early |")
    print("|---|---|---|---|---|---|---|")
    for config, ratio, result, _, value, size, stopped in rows:
        plain = f" ({result['ratio_plain']:.3f})" if result["ratio_plain"] is not None else ""
        print(f"| {config} | {ratio:.1f} | {result['ratio']:.3f}{plain} | {result['mean_error']:.4f} | {value:.2f} | "
              f"{f'{size:,}' if size else '–'} | {stopped if config != 'whiten' else '–'} |")


if __name__ == "__main__":
    main()
