"""Expert-reduction benchmark: submoe vs expert_prune vs expert_average on the SmolLM2-MoE fixture.

    python bench/moe_fixture.py --out runs/fixtures/smollm2-moe-e8k2        # once (see its docstring)
    python bench/submoe.py --fixture runs/fixtures/smollm2-moe-e8k2 [--kept 6,4] [--max-windows 40]
    python bench/submoe.py --fixture ... --methods submoe,submoe_lowrank --ratio 0.3,0.5   # Sub-MoE†

Every row runs the real layer-wise pipeline (sequential, statistics from the partly merged model) on
the same calibration windows, then WikiText-2 test perplexity with the same windows; the E-expert
fixture itself is measured in the same run and is the baseline of the ratio column.
``submoe_lowrank`` is Sub-MoE† (``submoe`` with the intra-expert ``ratio``: whitened union SVD, low-rank
merged experts), one row per ``--ratio``; "block params" is the MoE blocks' stored parameters after / before.
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch

from lrcompress.compressor import get_compressor
from lrcompress.data import calibration_windows, data_dir, load_text, tokenize
from lrcompress.eval import EvalContext, perplexity
from lrcompress.models import adapter_for, load_model
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from lrcompress.recipe import PerplexitySpec


def evaluate(model, tokenizer, args) -> tuple[float, str, float]:
    started = time.perf_counter()
    result = perplexity(model, tokenizer, PerplexitySpec(max_windows=args.max_windows),
                        EvalContext(data_dir(None, None)))
    return result.value, result.protocol, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True)
    parser.add_argument("--methods", default="expert_prune,expert_average,submoe")
    parser.add_argument("--kept", default="6,4", help="experts kept per block (E')")
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--extra", default="", help="extra submoe options, e.g. subspace_rank=96")
    parser.add_argument("--ratio", default="0.5", help="submoe_lowrank: intra-expert ratios (comma list)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.fixture)
    experts = loaded.model.config.num_local_experts
    text = load_text("wikitext2", "validation", data_dir(None, None))
    windows = calibration_windows(tokenize(loaded.tokenizer, text.text), args.num_samples, 512, 0)
    print(f"Fixture {args.fixture} (Mixtral-format SmolLM2-135M, E={experts}, "
          f"top-{loaded.model.config.num_experts_per_tok}); calibration wikitext2/validation "
          f"{args.num_samples}×512 seed 0; every MoE block reduced; sequential")
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__} "
          "(shared with other jobs: timings are indicative only)\n")
    print("| method | experts kept | block params | perplexity | ppl / fixture | mean block rel. error | compress s "
          "| eval s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    base, protocol, seconds = evaluate(loaded.model, loaded.tokenizer, args)
    row("fixture (no reduction)", experts, 1.0, base, base, None, 0.0, seconds)
    for kept in [int(k) for k in args.kept.split(",")]:
        for label, method, options in variants(args):
            model = load_model(args.fixture).model
            cls = get_compressor(method)
            stage = Stage(0, cls(cls.Config(num_experts=kept, **options)), ["*"])
            started = time.perf_counter()
            records = LayerwisePipeline(LayerWalk(model, adapter_for(model), windows, PipelineSettings(batch_size=4)), [stage]).run()
            compress = time.perf_counter() - started
            error = sum(r.relative_error for r in records) / len(records)
            kept_params = sum(r.params_after for r in records) / sum(r.params_before for r in records)
            value, _, seconds = evaluate(model, loaded.tokenizer, args)
            row(label, kept, kept_params, value, base, error, compress, seconds)
    print(f"\nPerplexity: {protocol}")


def variants(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, compressor, options) for every requested method; submoe_lowrank: one per --ratio."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for method in args.methods.split(","):
        if method == "submoe_lowrank":
            rows += [(f"submoe_lowrank ratio={r}", "submoe", {"ratio": float(r)}) for r in args.ratio.split(",")]
        else:
            rows.append((method, method, {}))
    extra = {k: int(v) for k, v in (item.split("=") for item in args.extra.split(",") if item)}
    if extra:
        rows.append(("submoe" + "".join(f" {k}={v}" for k, v in extra.items()), "submoe", extra))
    return rows


def row(label: str, kept: int, params: float, value: float, base: float, error: float | None, compress: float,
        seconds: float) -> None:
    """One table row, printed as soon as it is measured (a long run shows its rows as they come)."""
    err = "–" if error is None else f"{error:.3f}"
    print(f"| {label} | {kept} | {params:.1%} | {value:.2f} | {value / base:.2f}× | {err} | {compress:.0f} "
          f"| {seconds:.0f} |", flush=True)

if __name__ == "__main__":
    main()
