"""Build a real MoE to measure expert merging on: SmolLM2-135M with every MLP split into experts.

    python bench/moe_fixture.py --out runs/fixtures/smollm2-moe [--experts 8] [--top-k 2]

No pretrained MoE is available offline here, so the fixture is made from the real dense model
(MoEfication-style, Zhang et al. 2022) and saved as a standard **Mixtral** checkpoint (Mixtral's
attention, norms and rotary embedding are Llama's, so the dense weights carry over unchanged):

* each layer's 1536 MLP neurons are split into E equal groups by balanced k-means on their
  co-activation pattern (|act(gate·x)·(up·x)| over calibration tokens, normalized, randomly projected
  to 256 dimensions), so experts are functionally
  distinct (neurons that fire together stay together) and the sum of all experts is the dense MLP;
* a linear router is fitted by ridge least squares to predict each expert's output norm from the
  MLP input, then scaled down so that its logits are ~1e-3: the renormalized top-k weights are then
  ≈ 1/k, and each expert's down projection is multiplied by k, so the block computes ≈ the sum of the
  k experts the router picks (dense MLP restricted to the most important neuron groups).

Why this rather than training a small MoE: it keeps the real model's attention and embeddings and
a real language-modeling quality scale (perplexity comparable to the dense 28.7), costs a minute on
a CPU, and the experts are genuinely different functions with a router that matters. Calibration
for the fixture uses WikiText-2 *validation* windows (seed 1234, different windows from the
compression calibration's seed 0); evaluation is on the test split only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lrcompress.compressor.expert_merge import kmeans
from lrcompress.data import calibration_windows, data_dir, load_text, tokenize
from lrcompress.models import load_model

ROUTER_LOGIT_SCALE = 1e-3      # std of the router logits: top-k weights ≈ 1/k
RIDGE = 1e-3                   # × mean(diag XᵀX)
PROJECTION = 256               # dimensions of the neuron features clustered


def collect_mlp_inputs(model: nn.Module, windows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The input of every layer's MLP (post-attention-norm hidden states) for the windows, T × hidden."""
    layers = model.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: store[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        for chunk in windows.split(batch):
            model(input_ids=chunk, use_cache=False)
    for h in hooks:
        h.remove()
    return [torch.cat(parts) for parts in store]


def balanced_groups(features: torch.Tensor, groups: int, seed: int, rounds: int = 10) -> list[torch.Tensor]:
    """Equal-size clusters of the rows of ``features``: k-means centroids, then a capacity-limited greedy
    assignment (closest pairs first), centroids recomputed, repeated."""
    n = features.shape[0]
    size = n // groups
    labels = kmeans(features, groups, seed)
    for _ in range(rounds):
        centers = torch.stack([features[labels == g].mean(0) for g in range(groups)])
        dist = torch.cdist(features, centers)
        order = dist.flatten().argsort()
        new = torch.full((n,), -1, dtype=torch.long)
        room = [size] * groups
        for flat in order.tolist():
            row, g = divmod(flat, groups)
            if new[row] < 0 and room[g] > 0:
                new[row], room[g] = g, room[g] - 1
        if torch.equal(new, labels):
            break
        labels = new
    return [torch.nonzero(labels == g).flatten() for g in range(groups)]


def moefy_layer(mlp: nn.Module, x: torch.Tensor, experts: int, top_k: int, seed: int):
    """(gate_up E × 2I × H, down E × H × I, router E × H, routing agreement) for one dense MLP."""
    x = x.double()
    gate, up, down = (mlp.gate_proj.weight.double(), mlp.up_proj.weight.double(), mlp.down_proj.weight.double())
    h = nn.functional.silu(x @ gate.T) * (x @ up.T)                       # T × 1536
    features = h.abs().T
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # Random Gaussian projection of the T-dim co-activation patterns to PROJECTION dims (distances are
    # kept up to a few %, Johnson-Lindenstrauss) so that k-means costs seconds, not minutes, per layer.
    g = torch.Generator().manual_seed(seed)
    features = features @ torch.randn(features.shape[1], PROJECTION, generator=g, dtype=features.dtype)
    groups = balanced_groups(features.float(), experts, seed)
    norms = torch.stack([(h[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)   # T × E
    g = x.T @ x
    g += RIDGE * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    target = norms - norms.mean(0)
    router = torch.linalg.solve(g, x.T @ target).T                          # E × H
    logits = x @ router.T
    agreement = (logits.topk(top_k, 1).indices.sort(1).values == norms.topk(top_k, 1).indices.sort(1).values).all(1)
    router = router * (ROUTER_LOGIT_SCALE / logits.std())
    gate_up = torch.stack([torch.cat([gate[gr], up[gr]]) for gr in groups])
    down_e = torch.stack([down[:, gr] * top_k for gr in groups])
    return gate_up, down_e, router, float(agreement.double().mean())


@torch.no_grad()
def build(dense: nn.Module, inputs: list[torch.Tensor], experts: int, top_k: int, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    c = dense.config
    config = AutoConfig.for_model(
        "mixtral", vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size // experts,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, sliding_window=None,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert not [k for k in unexpected if ".mlp." not in k], unexpected
    for index, (layer, x) in enumerate(zip(dense.model.layers, inputs)):
        gate_up, down, router, agreement = moefy_layer(layer.mlp, x, experts, top_k, seed + index)
        block = moe.model.layers[index].mlp
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(gate_up.float())
            block.experts.down_proj.copy_(down.float())
            block.gate.weight.copy_(router.float())
            sample = x[:512]
            block.gate.top_k = experts                    # all experts: must reproduce the dense MLP
            full = block(sample[None])[0] * experts / top_k     # weights ≈ 1/E each, experts × k
            block.gate.top_k = top_k
            exact = (full - layer.mlp(sample)).norm() / layer.mlp(sample).norm()
        print(f"layer {index:2d}: router picks the true top-{top_k} on {agreement:.1%} of tokens; "
              f"all-experts vs dense MLP rel. error {float(exact):.1e}", file=sys.stderr, flush=True)
    moe.tie_weights()
    return moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense SmolLM2 directory (default $LRCOMPRESS_SMOLLM2)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--retarget", default=None, help="derive from this fixture with --top-k instead of building")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retarget:
        retarget_top_k(Path(args.retarget), Path(args.out), args.top_k)
        return

    source = args.model or os.environ.get("LRCOMPRESS_SMOLLM2", "models/smollm2-135m")
    started = time.perf_counter()
    loaded = load_model(source)
    text = load_text("wikitext2", "validation", data_dir(None, None))
    windows = calibration_windows(tokenize(loaded.tokenizer, text.text), args.windows, 512, args.seed)
    inputs = collect_mlp_inputs(loaded.model, windows, 4)
    moe = build(loaded.model, inputs, args.experts, args.top_k, args.seed)
    out = Path(args.out)
    moe.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    (out / "fixture.json").write_text(json.dumps({
        "source": source, "experts": args.experts, "top_k": args.top_k, "windows": args.windows,
        "seq_len": 512, "seed": args.seed, "calibration": text.description,
        "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s", file=sys.stderr)




def retarget_top_k(source: Path, out: Path, top_k: int) -> None:
    """The same fixture with another top-k: nothing but the ×k scale of the down projections depends on k
    (the router and the expert split do not), so rescale them instead of rebuilding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    old = model.config.num_experts_per_tok
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj.mul_(top_k / old)
            layer.mlp.gate.top_k = top_k
    model.config.num_experts_per_tok = top_k
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    meta = json.loads((source / "fixture.json").read_text())
    (out / "fixture.json").write_text(json.dumps({**meta, "top_k": top_k, "retargeted_from": str(source)}, indent=2))


if __name__ == "__main__":
    main()
