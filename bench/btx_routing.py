"""Where the specialist fixture's routers send each domain's held-out tokens (issue 32).

    LRCOMPRESS_DATA=... python bench/btx_routing.py --fixture DIR [--windows 8] [--json OUT]

Why: the build reports the routers' top-1 = domain accuracy out of sample (≈ 65%), which cannot tell a
token sent to the other domain of its family (web_a → web_b: harmless, both experts model web text) from
one sent to another family (web → book: an expert trained on other text). Per domain, on its held-out
windows (rebuilt from the fixture's recorded arguments, as ``bench/submoe_table.py`` does: no expert
trained on them, no router was fitted on them), this prints the share of the top-k routing slots, over
every MoE layer, that go to each family's experts (the family is the domain name's part before ``_``),
and the top-1 = family accuracy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def family(domain: str) -> str:
    """``web_a`` -> ``web``: the domains of one family are two halves of one source."""
    return domain.split("_")[0]


def slot_shares(router_logits: list[torch.Tensor], top_k: int, expert_domains: list[str], own: str
                ) -> dict[str, float | dict[str, float]]:
    """From the routers' logits (one tokens × experts tensor per MoE layer) of one domain's tokens: the share
    of the top-k slots per family, the share on the domain's own expert, the top-1 = family accuracy."""
    families = sorted({family(d) for d in expert_domains})
    index = torch.tensor([families.index(family(d)) for d in expert_domains])
    top = torch.stack([r.topk(top_k, dim=-1).indices for r in router_logits])          # layers × tokens × k
    counts = torch.bincount(index[top].flatten(), minlength=len(families)).double() / top.numel()
    own_expert = expert_domains.index(own)
    return {"family_share": dict(zip(families, counts.tolist())),
            "own_expert_share": float((top == own_expert).double().mean()),
            "top1_family_accuracy": float((index[top[..., 0]] == families.index(family(own))).double().mean())}


@torch.no_grad()
def routing_report(model, held_out: dict[str, torch.Tensor], expert_domains: list[str], batch: int = 4) -> dict:
    """``slot_shares`` for every domain's held-out windows (N × seq_len) through the Qwen2-MoE ``model``."""
    top_k = model.config.num_experts_per_tok
    report = {}
    for name, ids in held_out.items():
        logits: list[list[torch.Tensor]] = []
        for chunk in ids.split(batch):
            out = model(input_ids=chunk, output_router_logits=True, use_cache=False)
            logits.append([r for r in out.router_logits if r is not None])
        per_layer = [torch.cat([chunk[i] for chunk in logits]) for i in range(len(logits[0]))]
        report[name] = slot_shares(per_layer, top_k, expert_domains, name)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True, help="a fixture built by build_moe_fixture.py --domains")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows per domain (at most the build's)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    from submoe_table import fixture_splits                 # bench/submoe_table.py, beside this script
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fixture = Path(args.fixture)
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    splits = fixture_splits(fixture, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    names = [s.name for s in splits]
    report = routing_report(model, {s.name: s.held_out[:args.windows] for s in splits}, names)
    families = sorted({family(n) for n in names})
    print("| domain | " + " | ".join(f"{f} share" for f in families) + " | own expert share | top-1 family accuracy |")
    print("|---|" + "---|" * (len(families) + 2))
    for name, r in report.items():
        print(f"| {name} | " + " | ".join(f"{r['family_share'][f]:.1%}" for f in families)
              + f" | {r['own_expert_share']:.1%} | {r['top1_family_accuracy']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
