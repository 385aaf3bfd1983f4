"""Each expert of the specialist fixture alone on every domain's held-out text (issue 32).

    LRCOMPRESS_DATA=... LRCOMPRESS_SMOLLM2=... python bench/btx_cross.py --fixture DIR [--windows 8] [--json OUT]

Why: the build reports each expert on its own domain against the dense MLP, and the MoE per domain; when the
MoE loses to dense on a domain whose own experts beat dense, the cause is the other experts its tokens are
routed to (``bench/btx_routing.py``). This prints the matrix: rows the experts (the checkpoints under
``DIR/experts``, the expert alone in every MoE layer, ``btx.expert_loss``), columns the domains' held-out
windows (rebuilt from the fixture's recorded arguments as ``bench/submoe_table.py`` does), each cell the
next-token loss minus the dense model's on the same windows (negative: better than dense).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from btx import Trunk, expert_loss, held_out_loss      # bench/btx.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", required=True, help="a fixture built by build_moe_fixture.py --domains")
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2"), help="the dense model")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows per domain (at most the build's)")
    parser.add_argument("--json", default=None, help="also write the matrix here")
    args = parser.parse_args()
    if not args.model:
        raise SystemExit("give --model or set LRCOMPRESS_SMOLLM2")
    from submoe_table import fixture_splits                 # bench/submoe_table.py, beside this script
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fixture = Path(args.fixture)
    info = json.loads((fixture / "fixture_info.json").read_text())
    splits = fixture_splits(fixture, AutoTokenizer.from_pretrained(fixture))
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    trunk = Trunk(dense, min(info["moe_layers"]))
    held = {s.name: s.held_out[:args.windows] for s in splits}
    hidden = {name: trunk.prefix(ids) for name, ids in held.items()}
    base = {name: held_out_loss(trunk, ids, hidden=hidden[name]) for name, ids in held.items()}
    matrix = {}
    for index, split in enumerate(splits):
        saved = torch.load(fixture / "experts" / f"expert-{index}-{split.name}.pt")
        matrix[split.name] = {name: expert_loss(trunk, saved["trained"], ids, hidden[name]) - base[name]
                              for name, ids in held.items()}
    print("| expert \\ held-out text | " + " | ".join(held) + " |")
    print("|---|" + "---|" * len(held))
    print("| dense SmolLM2 (loss) | " + " | ".join(f"{base[n]:.3f}" for n in held) + " |")
    for expert, row in matrix.items():
        print(f"| {expert} | " + " | ".join(f"{row[n]:+.3f}" for n in held) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": base, "expert_minus_dense": matrix}, indent=1))


if __name__ == "__main__":
    main()
