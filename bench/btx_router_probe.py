"""Does a stronger L2 penalty make the specialist fixture's routers generalize better? (issue 32)

    LRCOMPRESS_DATA=... LRCOMPRESS_SMOLLM2=... python bench/btx_router_probe.py [--l2 1e-4,1e-3,1e-2] [--layers 22,26,29]

Why: the routers (``btx.fit_router``, L2 1e-4) are 95–97% right in sample and ≈ 65% out of sample, and web
text's tokens go to a web expert only about half the time (``bench/btx_routing.py``), so the MoE loses to
dense on web text although the web experts beat it. The routers read the *dense* model's MLP inputs, so
they do not depend on the experts: this fits them on the build's router-fit windows (the split of
``build_moe_fixture.py --domains`` with its defaults: 300 training, 8 router-fit, 4 router-test, 8
held-out windows of 256 per domain) at each L2 and scores them on the router-test and held-out windows
together (12 per domain, never fitted on): top-1 = domain, top-1 = family, the share of the top-2 slots
in the token's family, for all tokens and for web text's.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from btx import Trunk, fit_router, router_features          # bench/btx.py, beside this script
from btx_domains import DOMAINS, domain_splits
from btx_routing import family


def scores(weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, families: torch.Tensor,
           focus: torch.Tensor) -> dict[str, float]:
    """Top-1 domain / family accuracy, the top-2 family share, and that share on the ``focus`` tokens."""
    logits = features.double() @ weights.double().T
    top2 = logits.topk(2, dim=-1).indices
    same = families[top2] == families[labels][:, None]
    return {"top1_domain": float((logits.argmax(1) == labels).double().mean()),
            "top1_family": float((families[logits.argmax(1)] == families[labels]).double().mean()),
            "top2_family_share": float(same.double().mean()),
            "top2_family_share_focus": float(same[focus].double().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2"))
    parser.add_argument("--data", default=os.environ.get("LRCOMPRESS_DATA"))
    parser.add_argument("--l2", default="1e-4,1e-3,1e-2,3e-2")
    parser.add_argument("--layers", default="22,26,29", help="MoE layers to fit (the build's first is the split)")
    parser.add_argument("--first-moe-layer", type=int, default=22)
    parser.add_argument("--focus", default="web", help="the family whose tokens' top-2 share is reported apart")
    args = parser.parse_args()
    if not args.model or not args.data:
        raise SystemExit("give --model/--data or set LRCOMPRESS_SMOLLM2/LRCOMPRESS_DATA")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits = domain_splits(Path(args.data), list(DOMAINS), tokenizer, 256, 300, 8, 4, 8, 0)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    layers = [int(i) for i in args.layers.split(",")]
    trunk = Trunk(dense, args.first_moe_layer)
    fit = router_features(trunk, layers, [s.router_fit for s in splits])
    test = router_features(trunk, layers, [torch.cat([s.router_test, s.held_out]) for s in splits])
    names = sorted({family(d) for d in DOMAINS})
    families = torch.tensor([names.index(family(d)) for d in DOMAINS])

    def labels(features):
        return torch.cat([torch.full((len(f),), d, dtype=torch.long) for d, f in enumerate(features)])

    print(f"| L2 | layer | in-sample top-1 domain | top-1 domain | top-1 family | top-2 family share | "
          f"{args.focus} tokens' top-2 family share |")
    print("|---|---|---|---|---|---|---|")
    for l2 in (float(v) for v in args.l2.split(",")):
        for i in layers:
            x, y = torch.cat(fit[i]), labels(fit[i])
            xt, yt = torch.cat(test[i]), labels(test[i])
            w = fit_router(x, y, len(DOMAINS), l2=l2)
            inside = scores(w, x, y, families, y < 0)["top1_domain"]
            s = scores(w, xt, yt, families, families[yt] == names.index(args.focus))
            print(f"| {l2:g} | {i} | {inside:.1%} | {s['top1_domain']:.1%} | {s['top1_family']:.1%} | "
                  f"{s['top2_family_share']:.1%} | {s['top2_family_share_focus']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
