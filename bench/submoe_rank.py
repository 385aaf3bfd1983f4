"""How should Sub-MoE's shared subspace be truncated? The rank options measured on a synthetic MoE.

    python bench/submoe_rank.py [--layers 4] [--experts 8] [--kept 4] [--seeds 0,1,2] [--out rows.jsonl]

The issue-32 options of ``submoe``: the default (min(out, in), the rank of one expert weight), an energy
threshold (``subspace_energy``), a rank budget (``subspace_budget``) shared uniformly or by the
multi-layer allocation (``rank_allocation: layers``), and Sub-MoE† (``ratio``) with either allocation; the
frequency-pruning and averaging baselines run through the same pipeline for scale.

The model: a small random Mixtral (hidden 64, expert width 128, top-2), every MoE layer with E experts
that are E/2 prototypes × 2 (prototype + noise of 2% of its RMS, router rows alike within a prototype, so
merging within the pairs is the right answer), and layers whose prototypes differ in rank (layer l: the
product of random factors of inner dimension ``RANKS[l]``; the noise is full rank): some layers need their whole
subspace, others few directions, which is what an allocation across layers can exploit. Every row runs the
real pipeline (``expert_spectra`` pre-pass when asked, sequential statistics) on 8 random calibration windows
of 64 tokens; errors are measured on 8 other windows against the unmerged model: the mean over MoE blocks of
the block output error on the original model's inputs, and the relative error of the final logits.
Synthetic on purpose: no trained MoE with specialist experts exists here yet (docs/submoe.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from lrcompress.compressor import get_compressor
from lrcompress.models import adapter_for
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage, run_prepasses

RANKS = (4, 16, 48, 128)         # inner dimension of layer l's prototypes (cycled)

ROWS: list[tuple[str, str, dict]] = [
    ("prune: frequency", "expert_prune", {}),
    ("average", "expert_average", {}),
    ("Sub-MoE default (min(out, in))", "submoe", {}),
    ("Sub-MoE energy 0.99", "submoe", {"subspace_energy": 0.99}),
    ("Sub-MoE energy 0.9", "submoe", {"subspace_energy": 0.9}),
    ("Sub-MoE budget 0.5, uniform", "submoe", {"subspace_budget": 0.5}),
    ("Sub-MoE budget 0.5, layers", "submoe", {"subspace_budget": 0.5, "rank_allocation": "layers"}),
    ("Sub-MoE budget 0.25, uniform", "submoe", {"subspace_budget": 0.25}),
    ("Sub-MoE budget 0.25, layers", "submoe", {"subspace_budget": 0.25, "rank_allocation": "layers"}),
    ("Sub-MoE budget 0.25, layers, floor 0.1", "submoe",
     {"subspace_budget": 0.25, "rank_allocation": "layers", "rank_floor": 0.1}),
    ("Sub-MoE† ratio 0.5, uniform", "submoe", {"ratio": 0.5}),
    ("Sub-MoE† ratio 0.5, layers", "submoe", {"ratio": 0.5, "rank_allocation": "layers"}),
]


def synthetic_moe(layers: int, experts: int, seed: int):
    """The model described in the module docstring."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=2, max_position_embeddings=256)
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    groups = torch.arange(experts) // 2
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            block, inner = layer.mlp, RANKS[index % len(RANKS)]
            for weight in (block.experts.gate_up_proj, block.experts.down_proj):
                e, out, inp = weight.shape
                protos = torch.randn(experts // 2, out, inner, generator=g) @ torch.randn(experts // 2, inner, inp,
                                                                                          generator=g)
                protos = protos * 0.05 / protos.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()     # RMS 0.05 each
                weight.copy_(protos[groups] + 0.02 * 0.05 * torch.randn(weight.shape, generator=g))
            rows = torch.randn(experts // 2, config.hidden_size, generator=g)
            block.gate.weight.copy_(rows[groups] + 0.05 * torch.randn(block.gate.weight.shape, generator=g))
    return model


def errors(original, merged, windows) -> tuple[float, float]:
    """(mean block output error on the original inputs, relative error of the final logits)."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: captured.setdefault(i, []).append(a[0]))
               for i, layer in enumerate(original.model.layers)]
    with torch.no_grad():
        before = original(input_ids=windows, use_cache=False).logits
        for h in handles:
            h.remove()
        after = merged(input_ids=windows, use_cache=False).logits
        block = []
        for i, xs in captured.items():
            x = torch.cat(xs)
            a, b = (m.model.layers[i].mlp(x) for m in (original, merged))
            a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
            block.append(float((b - a).norm() / a.norm()))
    return sum(block) / len(block), float((after - before).norm() / before.norm())


def kept_ranks(record) -> dict[str, float] | int | None:
    """Triplets a block's merged clusters kept: the mean over its multi-expert clusters per weight type
    (what an energy threshold chose), Sub-MoE†'s rank, or None (no subspace)."""
    clusters = record.details.get("cluster_ranks")
    if clusters is None:
        return record.rank
    return {kind: sum(r for r in ranks if r is not None) / max(1, sum(r is not None for r in ranks))
            for kind, ranks in clusters.items()}


def run_row(model, method: str, options: dict, kept: int, seed: int, calibration, held_out) -> dict:
    merged = copy.deepcopy(model)
    cls = get_compressor(method)
    stage = Stage(0, cls(cls.Config(num_experts=kept, **({"seed": seed} if method != "expert_prune" else {}),
                                    **options)), ["*"], [])
    settings = PipelineSettings(batch_size=4)
    started = time.perf_counter()
    pre = run_prepasses(LayerWalk(merged, adapter_for(merged), calibration, settings), [stage])
    records = LayerwisePipeline(LayerWalk(merged, adapter_for(merged), calibration, settings), [stage],
                                precomputed=pre.statistics).run()
    seconds = time.perf_counter() - started
    block, logits = errors(model, merged, held_out)
    ranks = [kept_ranks(r) for r in records]
    params = sum(r.params_after for r in records) / sum(r.params_before for r in records)
    return {"block_error": block, "logit_error": logits, "ranks": ranks, "block_params": params,
            "groups": [r.details["groups"] for r in records], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--kept", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None, help="also write every row as JSON lines here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in ROWS}
    for seed in seeds:
        model = synthetic_moe(args.layers, args.experts, seed)
        g = torch.Generator().manual_seed(1000 + seed)
        calibration, held_out = (torch.randint(3, 259, (8, 64), generator=g) for _ in range(2))
        for label, method, options in ROWS:
            row = run_row(model, method, options, args.kept, seed, calibration, held_out)
            results[label].append(row)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps({"label": label, "seed": seed, **row}) + "\n")
    print(f"Synthetic Mixtral, {args.layers} MoE layers of {args.experts} experts (prototype pairs; prototype "
          f"ranks {RANKS[:args.layers]}), E' = {args.kept}; seeds {seeds}; torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} thread(s)\n")
    print("| method | block params | mean block error | logit error | kept rank, seed 0 (per block: gate/up/down "
          "mean over merged clusters, or †'s rank) |")
    print("|---|---|---|---|---|")
    for label, rows in results.items():
        def stat(key):
            values = [r[key] for r in rows]
            mean = sum(values) / len(values)
            return f"{mean:.4f} ({min(values):.4f}–{max(values):.4f})"
        ranks = rows[0]["ranks"]
        shown = ("; ".join("/".join(f"{r[k]:.0f}" for k in ("gate", "up", "down")) for r in ranks)
                 if isinstance(ranks[0], dict) else "; ".join(str(r) for r in ranks))
        print(f"| {label} | {rows[0]['block_params']:.3f} | {stat('block_error')} | {stat('logit_error')} | {shown} |")


if __name__ == "__main__":
    main()
