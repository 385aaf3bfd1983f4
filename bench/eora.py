"""EoRA vs the plain SVD residual vs no compensation, on top of several base compressions.

For every base compression (rtn 3-bit g128, gptq 3-bit g128, wanda 2:4, whitened SVD at ratio 0.3)
and every compensation (none; svd residual and eora at each rank), one full recipe run: layer-wise
calibration with propagation through the compressed + compensated layers, then WikiText-2 test
perplexity. Each result is appended to a JSONL file as soon as it exists (a rerun skips what is
there), and the table is printed from that file, together with the dense perplexity measured in the
same invocation.

    python bench/eora.py --model $LRCOMPRESS_SMOLLM2 --out runs/bench-eora [--bases rtn3,gptq3]
                         [--ranks 16,32,64] [--compensations none,svd,eora] [--calibration-samples 32]
                         [--factor-bits 4]

``--factor-bits`` quantizes the compensation factors A and B (round-to-nearest, as the paper's 4-bit
setting); such rows are kept apart from the float-factor rows in the JSONL and labelled in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn3": ("rtn 3-bit g128", {"method": "rtn", "bits": 3, "group_size": 128}),
    "gptq3": ("gptq 3-bit g128", {"method": "gptq", "bits": 3, "group_size": 128}),
    "wanda24": ("wanda 2:4", {"method": "prune", "scoring": "wanda", "pattern": "2:4"}),
    "whiten03": ("whiten (SVD-LLM) ratio 0.3", {"method": "whiten", "ratio": 0.3}),
}
SPACES = {"svd": "weight", "eora": "eigen"}


def recipe_dict(model: str, base: str, compensation: str, rank: int | None, args: argparse.Namespace) -> dict:
    stages = [dict(BASES[base][1])]
    if compensation != "none":
        stages.append({"method": "eora", "rank": rank, "space": SPACES[compensation], "bits": args.factor_bits})
    return {
        "model": {"path": model},
        "calibration": {"dataset": "wikitext2", "split": "validation", "num_samples": args.calibration_samples,
                        "seq_len": 512, "seed": 0},
        "stages": stages,
        "runtime": {"device": "auto", "batch_size": 4, "threads": args.threads},
        "output": {"save": False},
        "eval": {"perplexity": [{"dataset": "wikitext2", "split": "test", "seq_len": 512,
                                 "max_windows": args.windows}]},
    }


def run_one(recipe: dict) -> dict:
    from lrcompress.recipe import parse_recipe
    from lrcompress.runner import run_recipe

    started = time.perf_counter()
    result = run_recipe(parse_recipe(recipe))
    m = result.metrics
    added = sum(r.params_after - r.params_before for r in m.modules if r.method == "eora")
    ppl = next(iter(m.eval.perplexity.values()))
    c = m.compression
    return {"perplexity": ppl.value, "protocol": ppl.protocol, "added_params": added,
            "targeted_params_before": c.targeted_params_before, "targeted_params_after": c.targeted_params_after,
            "targeted_bytes_before": c.targeted_bytes_before, "targeted_bytes_after": c.targeted_bytes_after,
            "seconds": time.perf_counter() - started}


def dense_perplexity(model: str, args: argparse.Namespace) -> dict:
    from lrcompress.data import data_dir
    from lrcompress.eval import EvalContext, perplexity
    from lrcompress.recipe import PerplexitySpec
    from lrcompress.models import load_model

    loaded = load_model(model)
    result = perplexity(loaded.model, loaded.tokenizer, PerplexitySpec(max_windows=args.windows),
                        EvalContext(data_dir(None)))
    return {"perplexity": result.value, "protocol": result.protocol, "seconds": result.seconds}


def module_errors(model_path: str, names: list[str], ranks: list[int], windows: int) -> str:
    """Layer-wise relative output errors ‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖ of single real modules (cheap: no pipeline, no
    perplexity): Grams from ``windows`` windows of wiki.valid through the dense model, each base, then
    the svd residual and eora at each rank on top of it."""
    import torch

    from lrcompress.compressor import GramStatistic, OriginalWeight, get_compressor
    from lrcompress.compressor.linalg import relative_output_error
    from lrcompress.data import data_dir, load_text, tokenize
    from lrcompress.models import load_model
    from lrcompress.modules import dense_weight

    loaded = load_model(model_path)
    model = loaded.model
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "validation", data_dir(None)).text)
    ids = ids[: windows * 512].view(windows, 512)
    grams = {n: GramStatistic(model.get_submodule(n).in_features) for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: grams[n].observe(a[0], o))
             for n in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()

    def compress(method, module, stats, **options):
        cls = get_compressor(method)
        return cls(cls.Config(**options)).compress("m", module, stats).module

    lines = ["| module | base | none | " + " | ".join(f"svd r{r} | eora r{r}" for r in ranks) + " |",
             "|---|---|---|" + "---|---|" * len(ranks)]
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight.detach()
        stats = {"gram": grams[name], "original_weight": OriginalWeight(w)}
        g = grams[name].gram(name)
        for base_key, (label, options) in BASES.items():
            options = {k: v for k, v in options.items() if k != "method"}
            base = compress(BASES[base_key][1]["method"], linear, stats, **options)
            cells = [f"{relative_output_error(w, dense_weight(base), g):.4f}"]
            for rank in ranks:
                for space in ("weight", "eigen"):
                    module = compress("eora", base, stats, rank=rank, space=space)
                    cells.append(f"{relative_output_error(w, dense_weight(module), g):.4f}")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict], dense: dict | None) -> str:
    lines = []
    if dense:
        lines.append(f"dense perplexity: {dense['perplexity']:.3f} ({dense['protocol']})")
    lines += ["", "| base | compensation | rank | added params | targeted MiB (after) | perplexity | vs none |",
              "|---|---|---|---|---|---|---|"]
    none = {r["base"]: r["perplexity"] for r in rows if r["compensation"] == "none"}
    order = {name: i for i, name in enumerate(BASES)}
    for r in sorted(rows, key=lambda r: (order[r["base"]], r["rank"] or 0, r.get("factor_bits") or 0,
                                         r["compensation"])):
        delta = f"{r['perplexity'] - none[r['base']]:+.3f}" if r["base"] in none and r["compensation"] != "none" else "–"
        bits = f" (A, B {r['factor_bits']}-bit)" if r.get("factor_bits") else ""
        lines.append(f"| {BASES[r['base']][0]} | {r['compensation']}{bits} | {r['rank'] or '–'} | {r['added_params']:,} | "
                     f"{r['targeted_bytes_after'] / 2**20:.2f} | {r['perplexity']:.3f} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2", "models/smollm2-135m"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-eora"))
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--compensations", default="none,svd,eora")
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--factor-bits", type=int, default=None,
                        help="quantize the compensation factors A and B to this many bits (the paper uses 4)")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--module-errors", default=None, metavar="NAMES",
                        help="instead of perplexity runs: layer-wise output errors of these modules (comma-separated)")
    args = parser.parse_args()
    if args.module_errors:
        print(module_errors(args.model, args.module_errors.split(","), [int(r) for r in args.ranks.split(",")],
                            args.calibration_samples))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    dense_file = args.out / "dense.json"
    if not args.skip_dense and not dense_file.exists():
        dense_file.write_text(json.dumps(dense_perplexity(args.model, args)))
    dense = json.loads(dense_file.read_text()) if dense_file.exists() else None
    def key_of(r: dict) -> tuple:
        bits = r.get("factor_bits") if r["compensation"] != "none" else None
        return r["base"], r["compensation"], r["rank"], r["calibration_samples"], bits

    done = {key_of(r) for r in rows}
    ranks = [int(r) for r in args.ranks.split(",")]
    for base in args.bases.split(","):
        for compensation in args.compensations.split(","):
            for rank in ([None] if compensation == "none" else ranks):
                row = {"base": base, "compensation": compensation, "rank": rank,
                       "calibration_samples": args.calibration_samples, "factor_bits": args.factor_bits}
                if key_of(row) in done:
                    continue
                row.update(run_one(recipe_dict(args.model, base, compensation, rank, args)))
                rows.append(row)
                with results_file.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"{base} {compensation} {rank}: perplexity {row['perplexity']:.3f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    print(table(rows, dense))


if __name__ == "__main__":
    main()
