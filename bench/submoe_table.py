"""Expert reduction on the trained MoE fixture: one table, pruning vs merging vs Sub-MoE, at E→¾E and E→½E.

    python bench/build_moe_fixture.py ...                        # once: the Branch-Train-MiX fixture
    python bench/submoe_table.py --fixture DIR --out runs/submoe_table.jsonl [--tasks arc_easy,piqa --limit 200]
    python bench/submoe_table.py --fixture DIR --out runs/submoe_table.jsonl --print   # the table only

Rows: the fixture itself; expert pruning by routing frequency and by REAP score; frequency-weighted
averaging of k-means output-similarity clusters (MC-SMoE-like); HC-SMoE-style (hierarchical clusters,
averaged); Sub-MoE as the paper describes it (truncated union SVD, frequency-merged V); Sub-MoE's
clusters merged by RegMean; Sub-MoE† (whitened union SVD, low-rank experts) at one intra-expert ratio.
Each row runs the layer-wise pipeline (sequential, every MoE block reduced) on the same calibration
windows (WikiText-2 validation), then WikiText-2 test perplexity and, with ``--tasks``, lm-eval
zero-shot tasks. Resumable: every finished (row, experts kept, what was measured) is one JSON line in
``--out``; rows already there are skipped, so a stopped run continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lrcompress.compressor import get_compressor
from lrcompress.data import calibration_windows, data_dir, load_text, tokenize
from lrcompress.eval import EvalContext, perplexity
from lrcompress.eval.lm_eval_tasks import evaluate_tasks
from lrcompress.models import adapter_for, load_model
from lrcompress.models.moe import expert_count_key
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from lrcompress.recipe import PerplexitySpec


def rows(dagger_ratio: float) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(label, compressor, options); compressor None: the unreduced fixture."""
    return [
        ("fixture (no reduction)", None, {}),
        ("prune: frequency", "expert_prune", {}),
        ("prune: REAP", "expert_prune", {"score": "reap"}),
        ("merge: frequency-weighted average (MC-SMoE-like)", "expert_average", {}),
        ("merge: HC-SMoE-style (hierarchical, average)", "expert_average", {"clustering": "hierarchical"}),
        ("Sub-MoE (paper: truncated union SVD)", "submoe", {}),
        ("Sub-MoE clusters + RegMean", "submoe", {"merge": "regmean"}),
        (f"Sub-MoE† (ratio {dagger_ratio})", "submoe", {"ratio": dagger_ratio}),
        ("Sub-MoE clusters + RegMean, ridge towards the average", "submoe",
         {"merge": "regmean", "regmean_prior": "average"}),
    ]


def done(path: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["label"], r["kept"], r["measure"]): r for r in records}


def reduce(fixture: str, method: str, options: dict[str, Any], kept: int, windows: torch.Tensor):
    loaded = load_model(fixture)
    model = loaded.model
    cls = get_compressor(method)
    stage = Stage(0, cls(cls.Config(num_experts=kept, **options)), ["*"])
    started = time.perf_counter()
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), windows, PipelineSettings(batch_size=4)), [stage]).run()
    info = {"compress_s": round(time.perf_counter() - started, 1),
            "block_rel_error": sum(r.relative_error for r in records) / len(records),
            "block_params": sum(r.params_after for r in records) / sum(r.params_before for r in records)}
    return model, loaded.tokenizer, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True)
    parser.add_argument("--out", required=True, help="JSONL of finished rows (appended; resumable)")
    parser.add_argument("--kept", default=None, help="experts kept, e.g. 6,4 (default: ¾E and ½E)")
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--tasks", default="", help="lm-eval zero-shot tasks, e.g. arc_easy,piqa (empty: none)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--dagger-ratio", type=float, default=0.3)
    parser.add_argument("--only", default="", help="comma list of row numbers (1-based) to run")
    parser.add_argument("--print", action="store_true", help="print the table from --out and stop")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.print:
        print_table(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.fixture)
    experts = getattr(loaded.model.config, expert_count_key(loaded.model.config))
    kept_list = [int(k) for k in args.kept.split(",")] if args.kept else [round(0.75 * experts), experts // 2]
    text = load_text("wikitext2", "validation", data_dir(None, None))
    windows = calibration_windows(tokenize(loaded.tokenizer, text.text), args.num_samples, 512, 0)
    tasks = [t for t in args.tasks.split(",") if t]
    only = {int(i) for i in args.only.split(",") if i}
    del loaded
    for number, (label, method, options) in enumerate(rows(args.dagger_ratio), 1):
        if only and number not in only:
            continue
        for kept in [experts] if method is None else kept_list:
            finished = done(out)
            wanted = ["ppl"] + (["tasks"] if tasks else [])
            missing = [m for m in wanted if (label, kept, m) not in finished]
            if not missing:
                continue
            if method is None:
                reloaded = load_model(args.fixture)
                model, tokenizer, info = reloaded.model, reloaded.tokenizer, {"compress_s": 0.0}
            else:
                model, tokenizer, info = reduce(args.fixture, method, options, kept, windows)
            base = {"label": label, "method": method, "options": options, "kept": kept, "experts": experts,
                    "threads": torch.get_num_threads(), **info}
            for measure in missing:
                started = time.perf_counter()
                if measure == "ppl":
                    result = perplexity(model, tokenizer, PerplexitySpec(max_windows=args.max_windows),
                                        EvalContext(data_dir(None, None)))
                    values: dict[str, Any] = {"perplexity": result.value, "protocol": result.protocol}
                else:
                    raw = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=8,
                                         data_directory=data_dir(None, None))
                    values = {"tasks": {t: {k: v for k, v in r.items() if k in ("acc", "acc_norm", "samples")}
                                        for t, r in raw.items()}, "limit": args.limit}
                record = {**base, "measure": measure, **values, "eval_s": round(time.perf_counter() - started, 1)}
                with out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    print_table(out)


def print_table(path: Path) -> None:
    records = done(path)
    keys = sorted({(label, kept) for label, kept, _ in records}, key=lambda k: (-k[1], _order(k[0])))
    base = next((r["perplexity"] for (label, _, m), r in records.items() if r["method"] is None and m == "ppl"), None)
    tasks = sorted({t for r in records.values() for t in r.get("tasks", {})})
    print(f"Machine: {platform.machine()}, torch {torch.__version__}; threads as recorded per row\n")
    print("| method | experts | block params | perplexity | ppl / fixture | mean block rel. error | "
          + "".join(f"{t} acc | " for t in tasks) + "compress s |")
    print("|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|")
    for label, kept in keys:
        ppl = records.get((label, kept, "ppl"), {})
        zs = records.get((label, kept, "tasks"), {}).get("tasks", {})
        any_record = ppl or records.get((label, kept, "tasks"), {})
        value = ppl.get("perplexity")
        cells = [label, str(kept), f"{any_record.get('block_params', 1.0):.1%}",
                 f"{value:.2f}" if value else "–", f"{value / base:.3f}×" if value and base else "–",
                 f"{any_record['block_rel_error']:.4f}" if "block_rel_error" in any_record else "–"]
        cells += [f"{zs[t]['acc']:.3f}" if t in zs else "–" for t in tasks]
        cells.append(f"{any_record.get('compress_s', 0):.0f}")
        print("| " + " | ".join(cells) + " |")
    protocol = next((r["protocol"] for r in records.values() if "protocol" in r), "")
    print(f"\nPerplexity: {protocol}")


def _order(label: str) -> int:
    labels = [r[0] for r in rows(0.0)]
    return next((i for i, known in enumerate(labels) if label.split(" (ratio")[0] == known.split(" (ratio")[0]), 99)


if __name__ == "__main__":
    main()
