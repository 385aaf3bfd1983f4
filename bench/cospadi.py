"""CoSpaDi against whiten and lord on SmolLM2: perplexity and compression time, one table.

    python bench/cospadi.py [--model models/smollm2-135m] [--ratios 0.2,0.3] [--group-size 3]
                            [--iterations 1] [--num-samples 32] [--max-windows 40] [--threads 1]

To make every row comparable (and the run affordable on a shared 2-core CPU), the Grams of all 210
decoder-layer linears are collected once, from the uncompressed model (non-sequential, as in the
DESIGN.md reference figures), and every method compresses the same model from the same statistics
through its compressor contract (``compress`` / ``compress_group``); each row restores the dense
modules afterwards. `compress s` is the summed wall time of the compressor calls; the per-module
time of the slowest module kinds is printed below the table. Rows are printed as they finish.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict

import torch
from torch import nn

from lrcompress.compressor import GroupMember, get_compressor
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.data import calibration_windows, data_dir, load_text, tokenize
from lrcompress.eval import EvalContext, perplexity
from lrcompress.results import unique_param_count
from lrcompress.models import adapter_for, load_model
from lrcompress.modules import dense_weight, stored_params
from lrcompress.modules.surgery import replace_submodule
from lrcompress.pipeline.targets import select_targets
from lrcompress.recipe import PerplexitySpec

from grams import collect_grams


def target_names(model: nn.Module, layers: range | None = None) -> list[str]:
    adapter = adapter_for(model)
    names = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        if layers is not None and i not in layers:
            continue
        prefix = adapter.layer_prefix(i)
        names += [f"{prefix}.{n}" for n in select_targets(layer, prefix, ["*"], [])]
    return names


def groups_of(names: list[str], size: int) -> list[list[str]]:
    """Same relative name in `size` consecutive layers (names look like model.layers.<i>.<rest>)."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for n in names:
        parts = n.split(".")
        by_kind[".".join(parts[3:])].append(n)
    return [members[i:i + size] for members in by_kind.values() for i in range(0, len(members), size)]


def compress_all(model, names, stats, method: str, options: dict) -> dict:
    cls = get_compressor(method)
    compressor = cls(cls.Config(**options))
    originals = {n: model.get_submodule(n) for n in names}
    before = sum(stored_params(m) for m in originals.values())
    per_kind: dict[str, list[float]] = defaultdict(list)
    details = []
    total = 0.0
    errors = []
    for group in groups_of(names, compressor.group_size):
        members = [GroupMember(n, originals[n], stats[n]) for n in group]
        started = time.perf_counter()
        results = compressor.compress_group(members)
        seconds = time.perf_counter() - started
        total += seconds
        per_kind[".".join(group[0].split(".")[3:])].append(seconds / len(group))
        for n, result in zip(group, results):
            w = dense_weight(originals[n]).detach()
            errors.append(relative_output_error(w, dense_weight(result.module).detach(), stats[n]["gram"].gram(n)))
            replace_submodule(model, n, result.module)
            details.append(result.details)
    after = sum(stored_params(model.get_submodule(n)) for n in names)
    ratio_plain = None
    if details and "ratio_without_indices" in details[0]:
        plain = sum(stored_params(model.get_submodule(n)) - model.get_submodule(n).index_params() for n in names)
        ratio_plain = 1 - plain / before
    return {"originals": originals, "seconds": total, "ratio": 1 - after / before, "ratio_plain": ratio_plain,
            "per_kind": {k: sum(v) / len(v) for k, v in per_kind.items()},
            "mean_error": sum(errors) / len(errors), "details": details}


def restore(model, originals: dict) -> None:
    for n, module in originals.items():
        replace_submodule(model, n, module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--group-size", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=1, help="K-SVD iterations of cospadi")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default=None, help="compress only decoder layers FIRST-LAST (e.g. 0-9)")
    parser.add_argument("--configs", default="whiten,cospadi,cospadi-group,lord",
                        help="which rows, in order, per ratio")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = data_dir(None, None)
    started = time.perf_counter()
    loaded = load_model(args.model, "float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    source = load_text("wikitext2", "validation", directory)
    windows = calibration_windows(tokenize(tokenizer, source.text), args.num_samples, 512, 0)
    layers = None
    if args.layers:
        first, last = (int(v) for v in args.layers.split("-"))
        layers = range(first, last + 1)
    names = target_names(model, layers)
    stats = {n: {"gram": gram} for n, gram in collect_grams(model, names, windows, 4).items()}
    print(f"grams of {len(names)} modules from {len(windows)} windows in {time.perf_counter() - started:.0f}s",
          file=sys.stderr, flush=True)
    configs = {
        "whiten": ("whiten", {}),
        "lord": ("lord", {}),
        "cospadi": ("cospadi", {"iterations": args.iterations}),
        "cospadi-group": ("cospadi", {"iterations": args.iterations, "group_size": args.group_size}),
    }
    rows = []
    protocol = ""
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for label in args.configs.split(","):
            method, options = configs[label]
            result = compress_all(model, names, stats, method, {"ratio": ratio, **options})
            ppl = perplexity(model, tokenizer, PerplexitySpec(max_windows=args.max_windows), EvalContext(directory))
            protocol = ppl.protocol
            restore(model, result["originals"])
            rows.append((label, ratio, result, ppl.value))
            kinds = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(result["per_kind"].items()))
            print(f"{label} {ratio}: ppl {ppl.value:.3f}, compress {result['seconds']:.0f}s, "
                  f"ratio {result['ratio']:.3f}, mean rel. error {result['mean_error']:.4f}; per module: {kinds}",
                  file=sys.stderr, flush=True)
    print(f"\nModel {args.model} ({unique_param_count(model):,} params); calibration wikitext2/validation "
          f"{args.num_samples}×512 seed 0, Grams from the uncompressed model; {len(names)} decoder-layer "
          f"linears (layers {args.layers or 'all'}); cospadi: rho 2, {args.iterations} K-SVD iteration(s), group size {args.group_size} "
          f"for the group rows")
    print(f"Perplexity: {protocol}")
    print(f"Machine: {platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}\n")
    print("| method | ratio | targeted ratio (w/o indices) | mean rel. output error | perplexity | "
          "ppl / whiten | compress s |")
    print("|---|---|---|---|---|---|---|")
    base = {r: res[3] for res in rows for r in [res[1]] if res[0] == "whiten"}
    for label, ratio, result, value in rows:
        plain = f" ({result['ratio_plain']:.3f})" if result["ratio_plain"] is not None else ""
        rel = f"{value / base[ratio]:.2f}×" if ratio in base else "–"
        print(f"| {label} | {ratio:.1f} | {result['ratio']:.3f}{plain} | {result['mean_error']:.4f} | {value:.2f} | "
              f"{rel} | {result['seconds']:.0f} |")
    print("\nMean compression seconds per module, by kind:\n")
    for label, ratio, result, _ in rows:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["per_kind"].items()))
        print(f"- {label} {ratio:.1f}: {kinds}")


if __name__ == "__main__":
    main()
