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
zero-shot tasks. Resumable: every finished (row, experts kept, what was measured, calibration seed) is one
JSON line in ``--out``; rows already there are skipped, so a stopped run continues where it stopped.

Issue 32: ``--seeds 0,1,2`` repeats every reduced row on that many calibration samples (the table gives the
mean and the range); ``--domains`` adds each domain's held-out perplexity on a fixture built with
``build_moe_fixture.py --domains`` (its held-out windows are rebuilt from the arguments recorded in the
fixture's ``fixture_info.json``, so they are the windows no expert and no router saw). Zero-shot tasks are
scored per document too, and ``--print`` gives each row's paired difference from the fixture on the same
documents (its standard error is what says whether two rows differ); ``--dense MODEL`` adds the dense model
the experts grew from as a reference row (its tasks and WikiText-2 perplexity only).

The last rows merge fixed groups (``expert_groups``) given by ``--oracle-groups 0,1/2,3/4,5/6,7``: the
"oracle" clusters of a fixture whose experts' families are known (on ``btx-specialist-v4``, experts 0–1 code,
2–3 web, 4–5 book, 6–7 questions). The groups are an explicit option rather than derived from the fixture's
domain names (``fixture_info.json`` lists them in expert order): "family = the name before '_'" is only a
naming habit of ``bench/btx_domains.py``, and an explicit option states in the command what was merged and
lets any other grouping be compared. They run only where the experts kept equal the number of groups.
``--tag TEXT`` appends " [TEXT]" to every reduced row's label, so rows on another calibration (e.g.
``--per-domain 12``) are new records in the same ``--out`` instead of counting as done; every new record
has ``calibration_windows``, and RegMean/Sub-MoE† records the calibration tokens routed to each expert.
"""
from __future__ import annotations

import argparse
import json
import math
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
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage, run_prepasses
from lrcompress.recipe import PerplexitySpec


DENSE_LABEL = "dense (the model the experts grew from)"


ORACLE = "family clusters (oracle)"


def rows(dagger_ratio: float, oracle: list[list[int]] | None = None) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(label, compressor, options); compressor None: the unreduced fixture. The last rows merge the fixed
    groups ``oracle`` (``expert_groups``; None: ``--oracle-groups`` not given, they are not run)."""
    return [
        ("fixture (no reduction)", None, {}),
        ("prune: frequency", "expert_prune", {}),
        ("prune: REAP", "expert_prune", {"score": "reap"}),
        ("merge: frequency-weighted average (MC-SMoE-like)", "expert_average", {}),
        ("merge: HC-SMoE-style (hierarchical, average)", "expert_average", {"clustering": "hierarchical"}),
        ("Sub-MoE (paper: truncated union SVD)", "submoe", {}),
        ("Sub-MoE clusters + RegMean", "submoe", {"merge": "regmean"}),
        (f"Sub-MoE† (ratio {dagger_ratio})", "submoe", {"ratio": dagger_ratio}),
        (f"Sub-MoE† (ratio {dagger_ratio}), ranks allocated across layers", "submoe",
         {"ratio": dagger_ratio, "rank_allocation": "layers"}),
        ("Sub-MoE clusters + RegMean, ridge towards the average", "submoe",
         {"merge": "regmean", "regmean_prior": "average"}),
        # issue 32, item 2: the shared subspace's rank (the default above is min(out, in))
        ("Sub-MoE, subspace_energy 0.9", "submoe", {"subspace_energy": 0.9}),
        ("Sub-MoE, subspace_budget 0.5, uniform", "submoe", {"subspace_budget": 0.5}),
        ("Sub-MoE, subspace_budget 0.5, layers", "submoe", {"subspace_budget": 0.5, "rank_allocation": "layers"}),
        # issue 32: the merges within groups the user knows (Branch-Train-MiX: the experts' domain families)
        (f"averaging, {ORACLE}", "expert_average", {"expert_groups": oracle}),
        (f"Sub-MoE, {ORACLE}", "submoe", {"expert_groups": oracle}),
        (f"Sub-MoE + RegMean, {ORACLE}", "submoe", {"merge": "regmean", "expert_groups": oracle}),
    ]


def parse_groups(text: str) -> list[list[int]] | None:
    """'0,1/2,3' -> [[0, 1], [2, 3]] (groups separated by '/', members by ','); '' -> None."""
    if not text:
        return None
    try:
        return [[int(i) for i in group.split(",")] for group in text.split("/")]
    except ValueError:
        raise SystemExit(f"--oracle-groups {text!r}: expected groups of expert indices like 0,1/2,3") from None


def done(path: Path) -> dict[tuple[str, int, str, int], dict[str, Any]]:
    """Finished records by (label, experts kept, measure, calibration seed; 0 for records without one)."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["label"], r["kept"], r["measure"], r.get("seed", 0)): r for r in records}


def reduce(fixture: str, method: str, options: dict[str, Any], kept: int, windows: torch.Tensor):
    loaded = load_model(fixture)
    model = loaded.model
    cls = get_compressor(method)
    stage = Stage(0, cls(cls.Config(num_experts=kept, **options)), ["*"])
    settings = PipelineSettings(batch_size=4)
    started = time.perf_counter()
    pre = run_prepasses(LayerWalk(model, adapter_for(model), windows, settings), [stage])
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), windows, settings), [stage],
                                precomputed=pre.statistics).run()
    info = {"compress_s": round(time.perf_counter() - started, 1),
            "block_rel_error": sum(r.relative_error for r in records) / len(records),
            "block_params": sum(r.params_after for r in records) / sum(r.params_before for r in records),
            # which experts each block merged or kept (issue 32: the clusters decide per-domain losses)
            "groups": {str(r.layer): r.details["groups"] for r in records if "groups" in r.details}}
    routed = {str(r.layer): r.details["routed_tokens"] for r in records if "routed_tokens" in r.details}
    if routed:                     # calibration tokens routed to each original expert (RegMean, Sub-MoE†)
        info["routed_tokens"] = routed
    return model, loaded.tokenizer, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True)
    parser.add_argument("--out", required=True, help="JSONL of finished rows (appended; resumable)")
    parser.add_argument("--kept", default=None, help="experts kept, e.g. 6,4 (default: ¾E and ½E)")
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--max-windows", type=int, default=40, help="WikiText-2 test windows (0: no WikiText-2 ppl)")
    parser.add_argument("--calibration", default="wikitext2", choices=["wikitext2", "domains"],
                        help="domains: per seed, --per-domain windows drawn from each domain's router-fit and "
                        "router-test windows (a fixture built with --domains; never its held-out windows)")
    parser.add_argument("--per-domain", type=int, default=4, help="--calibration domains: windows per domain")
    parser.add_argument("--block-windows", type=int, default=2,
                        help="--domains: held-out windows per domain for the MoE blocks' output error")
    parser.add_argument("--tasks", default="", help="lm-eval zero-shot tasks, e.g. arc_easy,piqa (empty: none)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--dagger-ratio", type=float, default=0.3)
    parser.add_argument("--only", default="", help="comma list of row numbers (1-based) to run")
    parser.add_argument("--oracle-groups", default="",
                        help="the last rows' fixed expert groups, e.g. 0,1/2,3/4,5/6,7 (run only where the number "
                        "of groups is the experts kept; empty: those rows are not run)")
    parser.add_argument("--tag", default="",
                        help="appended to every reduced row's label as ' [TAG]', e.g. '12 per domain': rows on "
                        "another calibration get their own records in --out instead of counting as done")
    parser.add_argument("--seeds", default="0", help="calibration sample seeds, e.g. 0,1,2 (each reduced row per seed)")
    parser.add_argument("--domains", action="store_true",
                        help="also each domain's held-out perplexity (a fixture built with --domains)")
    parser.add_argument("--print", action="store_true", help="print the table from --out and stop")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dense", default=None,
                        help="also the dense model the fixture grew from (e.g. models/smollm2-135m): its --tasks "
                        "(and WikiText-2 perplexity), as a reference row")
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
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = fixture_splits(Path(args.fixture), loaded.tokenizer) if args.domains or args.calibration == "domains" else []
    if args.calibration == "domains":
        windows = {seed: domain_calibration(splits, args.per_domain, seed) for seed in seeds}
    else:
        text = load_text("wikitext2", "validation", data_dir(None, None))
        tokens = tokenize(loaded.tokenizer, text.text)
        windows = {seed: calibration_windows(tokens, args.num_samples, 512, seed) for seed in seeds}
    held_out = {s.name: s.held_out for s in splits} if args.domains else {}
    reference = block_reference(loaded.model, held_out, args.block_windows) if held_out else {}
    tasks = [t for t in args.tasks.split(",") if t]
    del loaded
    plan = plan_rows(args, experts, kept_list, seeds)
    for label, method, options, kept, seed in plan:
        finished = done(out)
        wanted = ["ppl"] if args.max_windows else []
        wanted += (["tasks"] if tasks else []) + (["domains"] if held_out and label != DENSE_LABEL else [])
        missing = [m for m in wanted if (label, kept, m, seed) not in finished]
        if not missing:
            continue
        if method is None:
            reloaded = load_model(options.get("dense", args.fixture))
            model, tokenizer, info = reloaded.model, reloaded.tokenizer, {"compress_s": 0.0}
        else:
            model, tokenizer, info = reduce(args.fixture, method, options, kept, windows[seed])
        base = {"label": label, "method": method, "options": options, "kept": kept, "experts": experts, "seed": seed,
                "calibration": args.calibration if method else None, "threads": torch.get_num_threads(),
                "calibration_windows": len(windows[seed]) if method else None, **info}
        for measure in missing:
            started = time.perf_counter()
            if measure == "ppl":
                result = perplexity(model, tokenizer, PerplexitySpec(max_windows=args.max_windows),
                                    EvalContext(data_dir(None, None)))
                values: dict[str, Any] = {"perplexity": result.value, "protocol": result.protocol}
            elif measure == "domains":
                values = {"domains": {name: windows_perplexity(model, ids) for name, ids in held_out.items()},
                          "held_out_block_rel_error": block_errors(model, reference)}
            else:
                raw = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=8,
                                     data_directory=data_dir(None, None), per_document=True)
                keep = ("acc", "acc_stderr", "acc_norm", "samples", "per_document")
                values = {"tasks": {t: {k: v for k, v in r.items() if k in keep} for t, r in raw.items()},
                          "limit": args.limit}
            record = {**base, "measure": measure, **values, "eval_s": round(time.perf_counter() - started, 1)}
            with out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print_table(out)


def plan_rows(args: argparse.Namespace, experts: int, kept_list: list[int], seeds: list[int]
              ) -> list[tuple[str, str | None, dict[str, Any], int, int]]:
    """(label, method, options, experts kept, seed) of every row to run, seed-major (a run stopped by a time
    limit has whole seeds, every row, rather than whole rows); ``--tag`` marks the reduced rows' labels."""
    only = {int(i) for i in args.only.split(",") if i}
    numbered = [(n, row) for n, row in enumerate(rows(args.dagger_ratio, parse_groups(args.oracle_groups)), 1)
                if not only or n in only]
    if only and any(options.get("expert_groups", []) is None for _, (_, _, options) in numbered):
        raise SystemExit("--only names a fixed-groups (oracle) row: give --oracle-groups")
    tag = f" [{args.tag}]" if args.tag else ""
    plan = [(label, method, options, experts, 0) for _, (label, method, options) in numbered if method is None]
    plan += [(label + tag, method, options, kept, seed) for seed in seeds for kept in kept_list
             for _, (label, method, options) in numbered if method is not None and _fits(options, kept)]
    if args.dense:
        plan.insert(0, (DENSE_LABEL, None, {"dense": args.dense}, 0, 0))
    return plan


def _fits(options: dict[str, Any], kept: int) -> bool:
    """Whether a row runs at ``kept`` experts: every row, except a fixed-groups row without groups (no
    --oracle-groups) or with another number of groups than ``kept``."""
    if "expert_groups" not in options:
        return True
    groups = options["expert_groups"]
    return groups is not None and len(groups) == kept


def fixture_splits(fixture: Path, tokenizer) -> list:
    """The domains' window splits of a fixture built with ``--domains``, rebuilt from its recorded
    arguments (the same split: held-out windows no expert trained on and no router was fitted on)."""
    from btx_domains import domain_splits          # bench/btx_domains.py, beside this script

    info = json.loads((fixture / "fixture_info.json").read_text())
    a = info["arguments"]
    if not a.get("domains"):
        raise SystemExit(f"{fixture}: not built with --domains, it has no held-out domain windows")
    return domain_splits(data_dir(None, None), a["domains"].split(","), tokenizer, a["seq_len"],
                         a["windows_per_domain"], a["router_windows"], a["router_test_windows"],
                         a["held_out_windows"], a["seed"])


def domain_calibration(splits: list, per_domain: int, seed: int) -> torch.Tensor:
    """The calibration sample of one seed: ``per_domain`` windows drawn (seeded) from each domain's
    router-fit and router-test windows, so every domain's experts see their tokens; never held-out text."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for split in splits:
        pool = torch.cat([split.router_fit, split.router_test])
        if len(pool) < per_domain:
            raise SystemExit(f"domain {split.name}: {len(pool)} router windows, {per_domain} asked for")
        chosen.append(pool[torch.randperm(len(pool), generator=g)[:per_domain]])
    return torch.cat(chosen)


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """The model's MoE blocks by layer index (the layers whose MLP has experts)."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


@torch.no_grad()
def block_reference(model, held_out: dict[str, torch.Tensor], per_domain: int
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer of the unreduced ``model``, its block's inputs on the first ``per_domain`` held-out
    windows of every domain and its outputs on them: what a reduced block is compared against."""
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in moe_blocks(model)}
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach()))
               for i, block in moe_blocks(model).items()]
    try:
        for ids in held_out.values():
            model(input_ids=ids[:per_domain], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: (torch.cat(x), moe_blocks(model)[i](torch.cat(x))) for i, x in inputs.items()}


@torch.no_grad()
def block_errors(model, reference: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, float]:
    """Relative output error ‖f'(X) − f(X)‖_F / ‖f(X)‖_F of each reduced MoE block on the unreduced model's
    held-out block inputs X (the block alone: the same inputs for every method)."""
    blocks = moe_blocks(model)
    return {i: float((blocks[i](x) - y).norm() / y.norm()) for i, (x, y) in reference.items()}


@torch.no_grad()
def windows_perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) of ``model`` over the windows ``ids`` (N × seq_len), each on its own."""
    total, count = 0.0, 0
    for chunk in ids.split(batch):
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def print_table(path: Path) -> None:
    """One line per (row, experts kept): the mean over calibration seeds, with the range when there are several."""
    records = done(path)
    keys = sorted({(label, kept) for label, kept, _, _ in records}, key=lambda k: (-k[1], _order(k[0]), k[0]))
    base = next((r["perplexity"] for (_, _, m, _), r in records.items() if _is_fixture(r) and m == "ppl"), None)
    tasks = sorted({t for r in records.values() for t in r.get("tasks", {})})
    domains = sorted({d for r in records.values() for d in r.get("domains", {})})
    print(f"Machine: {platform.machine()}, torch {torch.__version__}; threads as recorded per row\n")
    print("| method | experts | seeds | block params | perplexity | ppl / fixture | mean block rel. error | "
          "held-out block error | "
          + "".join(f"{t} acc | " for t in tasks) + "".join(f"{d} ppl | " for d in domains)
          + ("domains' geometric mean | " if domains else "") + "compress s |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * (len(tasks) + len(domains) + bool(domains)) + "---|")
    for label, kept in keys:
        mine = [r for (run_label, k, _, _), r in records.items() if (run_label, k) == (label, kept)]
        ppl = [r["perplexity"] for r in mine if r["measure"] == "ppl"]
        per_seed = {r.get("seed", 0): r for r in sorted(mine, key=lambda r: "block_rel_error" in r)}  # once per seed
        errors = [r["block_rel_error"] for r in per_seed.values() if "block_rel_error" in r]
        cells = [label, str(kept), str(len({r.get("seed", 0) for r in mine})), f"{mine[0].get('block_params', 1.0):.1%}",
                 _spread(ppl, "{:.2f}"), _spread([p / base for p in ppl], "{:.3f}×") if base else "–",
                 _spread(errors, "{:.4f}"),
                 _spread([sum(e.values()) / len(e) for r in mine if (e := r.get("held_out_block_rel_error"))], "{:.4f}")]
        cells += [_spread([r["tasks"][t]["acc"] for r in mine if t in r.get("tasks", {})], "{:.3f}") for t in tasks]
        cells += [_spread([r["domains"][d] for r in mine if d in r.get("domains", {})], "{:.2f}") for d in domains]
        if domains:
            cells.append(_spread([math.exp(sum(math.log(v) for v in r["domains"].values()) / len(r["domains"]))
                                  for r in mine if r.get("domains")], "{:.2f}"))
        cells.append(f"{sum(r.get('compress_s', 0) for r in per_seed.values()) / len(per_seed):.0f}")
        print("| " + " | ".join(cells) + " |")
    protocol = next((r["protocol"] for r in records.values() if "protocol" in r), "")
    print(f"\nPerplexity: {protocol}")
    print_paired(records)


def _is_fixture(record: dict[str, Any]) -> bool:
    """A record of the unreduced fixture (the reference of ratios and paired differences), not the dense row."""
    return record["method"] is None and record["label"] != DENSE_LABEL


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a − b, its standard error) over the same documents: the paired comparison of two models'
    0/1 scores. Its error is sd(a_i − b_i)/√n, small when the two mostly agree, where comparing the two
    accuracies' own standard errors (≈ √(p(1−p)/n) each) would call every small difference noise."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired scores need the same documents (>= 2): {len(a)} vs {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def print_paired(records: dict[tuple[str, int, str, int], dict[str, Any]]) -> None:
    """Per task with per-document scores: every record's accuracy ± its standard error, and its paired
    difference from the unreduced fixture's on the same documents."""
    scored = [r for r in records.values() if r["measure"] == "tasks"]
    fixture = next((r for r in scored if _is_fixture(r)), None)
    for task in sorted({t for r in scored for t in r["tasks"]}):
        rows_ = [r for r in scored if "per_document" in r["tasks"].get(task, {})]
        if not rows_:
            continue
        print(f"\n{task} (limit {rows_[0].get('limit')}): acc ± stderr; paired difference from the fixture ± stderr\n")
        print("| method | experts | seed | acc | paired Δ vs fixture |\n|---|---|---|---|---|")
        for r in sorted(rows_, key=lambda r: (-r["kept"], _order(r["label"]), r.get("seed", 0))):
            result = r["tasks"][task]
            cell = "–"
            if fixture is not None and r is not fixture and "per_document" in fixture["tasks"].get(task, {}):
                mean, se = paired_difference(result["per_document"]["acc"], fixture["tasks"][task]["per_document"]["acc"])
                cell = f"{mean:+.4f} ± {se:.4f}"
            print(f"| {r['label']} | {r['kept']} | {r.get('seed', 0)} | {result['acc']:.4f} ± "
                  f"{result.get('acc_stderr') or 0:.4f} | {cell} |")


def _spread(values: list[float], form: str) -> str:
    """The mean, and (min–max) when there are several values; '–' for none."""
    if not values:
        return "–"
    mean = form.format(sum(values) / len(values))
    return mean if len(values) == 1 else f"{mean} ({form.format(min(values))}–{form.format(max(values))})"


def _order(label: str) -> int:
    labels = [r[0] for r in rows(0.0)]
    label = label.split(" [")[0]                       # a --tag
    return next((i for i, known in enumerate(labels) if label.split(" (ratio")[0] == known.split(" (ratio")[0]), 99)


if __name__ == "__main__":
    main()
