"""FWSVD against svd and whiten on the demo model, with the Fisher pass's time and peak memory.

    python bench/fwsvd.py [--model models/smollm2-135m] [--ratios 0.1,0.2,0.3] [--json runs/bench-fwsvd.json]

All methods see the same statistics, collected once from the *uncompressed* model (the non-sequential
setting of DESIGN.md's reference figures): the Grams from one hooked forward pass over the calibration
windows, the Fisher sums from the library's pre-pass (``run_prepasses``, the code ``lrcompress run``
uses). Each (method, ratio) then compresses every decoder-layer linear with the library's compressor
from those statistics, swaps the replacements in, measures perplexity, and swaps the originals back.
The dense row is measured in the same run. Besides perplexity, the script prints why the methods
differ: per module type, the mean relative output error ‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖ and the Fisher-weighted error
‖(W−Ŵ)D‖/‖WD‖ of each method, and the shape of the Fisher importances f.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from lrcompress.compressor import get_compressor
from lrcompress.compressor.fwsvd import importance_scale
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.data import calibration_windows, data_dir, load_text, tokenize
from lrcompress.eval import EvalContext, perplexity
from lrcompress.models import adapter_for, load_model
from lrcompress.modules import dense_weight
from lrcompress.pipeline import LayerWalk, PipelineSettings, Stage, run_prepasses, select_targets
from lrcompress.modules.surgery import replace_submodule
from lrcompress.recipe import PerplexitySpec

from grams import collect_grams

METHODS = ("svd", "whiten", "fwsvd")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def target_names(model: nn.Module) -> list[str]:
    adapter = adapter_for(model)
    return [f"{adapter.layer_prefix(i)}.{name}" for i, layer in enumerate(adapter.decoder_layers(model))
            for name in select_targets(layer, adapter.layer_prefix(i), ["*"], [])]


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, d: torch.Tensor) -> float:
    w = weight.double()
    return float(torch.linalg.norm((w - approx.double()) * d) / torch.linalg.norm(w * d))


def module_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def fisher_shape(names: list[str], fisher: dict, grams: dict) -> dict[str, dict[str, float]]:
    """Per module type: how concentrated √f is, and how it relates to the activation scale √diag(G)."""
    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for name in names:
        root = fisher[name].input_importance(name).sqrt()
        top = torch.sort(root, descending=True).values
        k = max(1, len(top) // 100)
        act = torch.diagonal(grams[name].gram(name)).sqrt()
        corr = torch.corrcoef(torch.stack([root, act]))[0, 1].item()
        rows[module_kind(name)].append((float(top[0] / root.mean()), float(top[:k].sum() / root.sum()), corr))
    return {kind: {"max_over_mean": sum(v[0] for v in vals) / len(vals),
                   "top1pct_share": sum(v[1] for v in vals) / len(vals),
                   "corr_with_activation_rms": sum(v[2] for v in vals) / len(vals)} for kind, vals in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2", "models/smollm2-135m"))
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40, help="evaluation windows")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine more threads oversubscribe badly)")
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")

    directory = data_dir(None, None)
    loaded = load_model(args.model, "float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    source = load_text("wikitext2", "validation", directory)
    windows = calibration_windows(tokenize(tokenizer, source.text), args.num_samples, args.seq_len, 0)
    names = target_names(model)

    def ppl() -> float:
        spec = PerplexitySpec(dataset="wikitext2", split="test", seq_len=args.seq_len, max_windows=args.max_windows)
        return perplexity(model, tokenizer, spec, EvalContext(directory, batch_size=args.batch_size)).value

    started = time.perf_counter()
    dense = ppl()
    log(f"dense {dense:.3f} ({time.perf_counter() - started:.0f}s eval)")
    started = time.perf_counter()
    grams = collect_grams(model, names, windows, args.batch_size)
    gram_seconds = time.perf_counter() - started
    fwsvd_cls = get_compressor("fwsvd")
    stage = Stage(0, fwsvd_cls(fwsvd_cls.Config(ratio=0.2)), ["*"])
    pre = run_prepasses(LayerWalk(model, adapter_for(model), windows, PipelineSettings(batch_size=args.batch_size)), [stage])
    fisher = {name: pre.statistics[name]["fisher"] for name in names}
    fisher_report = pre.reports["fisher"]
    log(f"grams {gram_seconds:.0f}s; fisher pass {fisher_report}")
    shape = fisher_shape(names, fisher, grams)
    log(f"fisher shape {shape}")
    if args.json:  # the raw importances and activation scales, for analysis without re-running the pass
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        torch.save({name: {"fisher_in": fisher[name].input_sums, "fisher_out": fisher[name].output_sums,
                           "gram_diag": torch.diagonal(grams[name].sum_xx).clone()} for name in names},
                   Path(args.json).with_suffix(".stats.pt"))

    originals = {name: model.get_submodule(name) for name in names}
    results, errors = [], defaultdict(lambda: defaultdict(list))
    for ratio in ratios:             # ratio-major: an interrupted run still compares the methods
        for method in methods:
            cls = get_compressor(method)
            compressor = cls(cls.Config(ratio=ratio))
            started = time.perf_counter()
            for name, module in originals.items():
                stats = {"gram": grams[name], "fisher": fisher[name]}
                replacement = compressor.compress(name, module, stats).module
                weight, approx = dense_weight(module).detach(), dense_weight(replacement).detach()
                d, _ = importance_scale(fisher[name].input_importance(name), 1e-6)
                errors[(method, ratio)][module_kind(name)].append(
                    (relative_output_error(weight, approx, grams[name].gram(name)), weighted_error(weight, approx, d)))
                replace_submodule(model, name, replacement)
            compress_seconds = time.perf_counter() - started
            value = ppl()
            for name, module in originals.items():
                replace_submodule(model, name, module)
            results.append({"method": method, "ratio": ratio, "perplexity": value, "compress_seconds": compress_seconds})
            log(f"{method} {ratio}: {value:.3f} (compress {compress_seconds:.0f}s)")

    results.sort(key=lambda row: (methods.index(row["method"]), row["ratio"]))
    print(f"\nModel {args.model}; calibration wikitext2/validation {args.num_samples}×{args.seq_len} seed 0 "
          f"(statistics of the uncompressed model, all {len(names)} decoder-layer linears); perplexity "
          f"wikitext2/test, {args.max_windows} windows of {args.seq_len}")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| method | ratio | perplexity | ppl / dense |\n|---|---|---|---|")
    print(f"| dense | - | {dense:.2f} | 1.00× |")
    for row in results:
        print(f"| {row['method']} | {row['ratio']:.1f} | {row['perplexity']:.2f} | {row['perplexity'] / dense:.2f}× |")
    mib = 2**20
    print(f"\nFisher pass: {fisher_report['seconds']:.0f} s for {fisher_report['windows']} windows "
          f"(batch {args.batch_size}), peak memory {fisher_report['peak_memory_bytes'] / mib:.0f} MiB "
          f"(+{fisher_report['peak_memory_growth_bytes'] / mib:.0f} MiB over the loaded model; "
          f"{fisher_report['memory_measure']}); saved layer inputs per batch "
          f"{fisher_report['saved_boundaries_bytes_per_batch'] / mib:.0f} MiB; Gram pass {gram_seconds:.0f} s\n")
    kinds = sorted(shape)
    print("Mean relative output error ‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖ / Fisher-weighted error ‖(W−Ŵ)D‖/‖WD‖ per module type:\n")
    print("| method | ratio | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    for (method, ratio), per_kind in sorted(errors.items(), key=lambda item: (methods.index(item[0][0]), item[0][1])):
        cells = []
        for kind in kinds:
            pairs = per_kind[kind]
            cells.append(f"{sum(p[0] for p in pairs) / len(pairs):.3f} / {sum(p[1] for p in pairs) / len(pairs):.3f}")
        print(f"| {method} | {ratio:.1f} | " + " | ".join(cells) + " |")
    print("\nShape of the Fisher input importances √f (means over layers):\n")
    print("| module | max/mean | top-1% share | corr(√f, activation rms) |\n|---|---|---|---|")
    for kind in kinds:
        s = shape[kind]
        print(f"| {kind} | {s['max_over_mean']:.1f} | {s['top1pct_share']:.3f} | {s['corr_with_activation_rms']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "dense": dense, "rows": results, "fisher_pass": fisher_report, "gram_seconds": gram_seconds,
            "fisher_shape": shape,
            "errors": {f"{m} {r}": {k: v for k, v in per.items()} for (m, r), per in errors.items()},
        }, indent=2, default=str))


if __name__ == "__main__":
    main()
