"""Pilot of the specialist fixture (issue 32): how far apart do experts trained on different domains get,
per training step? A bounded run that prices the full build before it is started.

    LRCOMPRESS_SMOLLM2=... LRCOMPRESS_DATA=... python bench/btx_pilot.py --out DIR \\
        [--domains code_mbpp,book_a] [--layers 22-29] [--steps 120] [--snapshots 10,20,40,80,120] [--lr 1e-3]

For each domain (``bench/btx_domains.py``) one copy of the MLPs of ``--layers`` is trained exactly as the
full build trains an expert (``btx.train_expert``: AdamW, everything else frozen); at every snapshot step
its weights and its next-token loss on its own domain's held-out windows are kept. Then, per snapshot and
MoE layer, ``btx.expert_differences`` measures the experts' distances the way issue 15's fixture was
measured (mean pairwise relative Frobenius distance of gate, up and down together, and output cosines on
the dense model's MLP inputs of the held-out windows). Each domain's snapshots are saved as soon as it is
trained (``DIR/pilot-<domain>.pt``) and reused by a rerun with the same settings: the pilot resumes.
Prints and writes ``DIR/pilot.json``: the distance curve, held-out losses against the dense MLP's, seconds
per step, and the cost of a full build extrapolated from them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from btx import TrainSettings, Trunk, cached_prefix, expert_differences, expert_fingerprint, held_out_loss, \
    mlp_weights, router_features, train_expert                       # bench/btx.py, beside this script
from btx_domains import domain_splits
from build_moe_fixture import layer_list


def train_with_snapshots(trunk: Trunk, layers: list[int], split, settings: TrainSettings, snapshots: list[int],
                         hidden: torch.Tensor | None = None, held_out_hidden: torch.Tensor | None = None) -> dict:
    """Train one domain's expert; at each snapshot step keep its weights and held-out loss. ``seconds``:
    the training steps alone (the frozen prefix and the snapshots' evaluations are timed apart).
    ``hidden``/``held_out_hidden``: the prefix outputs of the training / held-out windows, if computed."""
    kept: dict[int, dict] = {}
    evaluating = [0.0]

    def on_step(step: int) -> None:
        if step in snapshots:
            started = time.perf_counter()
            kept[step] = {"weights": {i: mlp_weights(trunk.model.model.layers[i].mlp) for i in layers},
                          "held_out_loss": held_out_loss(trunk, split.held_out, hidden=held_out_hidden)}
            evaluating[0] += time.perf_counter() - started

    started = time.perf_counter()
    hidden = trunk.prefix(split.train) if hidden is None else hidden
    prefix = time.perf_counter() - started
    _, losses = train_expert(trunk, layers, hidden, split.train, settings, on_step)
    total = time.perf_counter() - started
    return {"snapshots": kept, "losses": losses, "seconds": total - prefix - evaluating[0],
            "prefix_seconds": prefix, "snapshot_seconds": evaluating[0]}


def step_seconds(trunk: Trunk, layers: list[int], hidden: torch.Tensor, ids: torch.Tensor, settings: TrainSettings,
                 steps: int) -> float:
    """Seconds per training step (mean over ``steps`` steps after one untimed step)."""
    timed = TrainSettings(**{**vars(settings), "steps": steps + 1, "warmup": 0})
    marks: list[float] = []
    train_expert(trunk, layers, hidden, ids, timed, lambda step: marks.append(time.perf_counter()))
    return (marks[-1] - marks[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2"))
    parser.add_argument("--data", default=os.environ.get("LRCOMPRESS_DATA"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--domains", default="code_mbpp,book_a")
    parser.add_argument("--layers", default="22-29")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--snapshots", default="10,20,40,80,120")
    parser.add_argument("--lr", default="1e-3", help="peak rate; a comma list trains every domain at each")
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--draw", default="random", choices=["random", "epochs"])
    parser.add_argument("--loss-positions", type=int, default=0, help="0: the loss on every position")
    parser.add_argument("--reinit", type=float, default=0.0,
                        help="Drop-Upcycling: fraction of every expert's neurons re-initialized (btx.drop_upcycle)")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="also time this many steps with the loss on every position and on --loss-positions")
    parser.add_argument("--prefix-cache", default=None, help="directory of cached prefix outputs (btx.cached_prefix)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-windows", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--router-fit", type=int, default=0,
                        help="router windows reserved as the build does (so the build's windows equal the pilot's)")
    parser.add_argument("--router-test", type=int, default=0)
    parser.add_argument("--full-experts", type=int, default=8, help="experts of the full build (for its cost)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.model or not args.data:
        sys.exit("give --model/--data or set LRCOMPRESS_SMOLLM2/LRCOMPRESS_DATA")
    snapshots = sorted({int(s) for s in args.snapshots.split(",")} | {args.steps})
    if snapshots[-1] > args.steps:
        sys.exit("a snapshot after the last step")
    layers = sorted(layer_list(args.layers))
    rates = [float(r) for r in args.lr.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.prefix_cache) if args.prefix_cache else None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    names = args.domains.split(",")
    splits = domain_splits(Path(args.data), names, tokenizer, args.seq_len, args.train_windows, args.router_fit,
                           args.router_test, args.held_out, args.seed)
    trunk = Trunk(dense, layers[0])
    dense_mlps = {i: mlp_weights(dense.model.layers[i].mlp) for i in layers}
    record: dict = {"arguments": vars(args), "domains": {}, "threads": torch.get_num_threads(), "rates": {}}
    trained: dict[float, dict] = {rate: {} for rate in rates}
    for index, split in enumerate(splits):
        began = time.perf_counter()
        hidden = cached_prefix(trunk, split.train, cache)
        held_hidden = cached_prefix(trunk, split.held_out, cache)
        prefix_s = time.perf_counter() - began
        dense_loss = held_out_loss(trunk, split.held_out, hidden=held_hidden)
        domain = record["domains"][split.name] = {
            "train_windows": len(split.train), "held_out_windows": len(split.held_out),
            "held_out_loss_dense": dense_loss, "prefix_seconds": round(prefix_s, 1), "by_rate": {}}
        for rate in rates:
            settings = TrainSettings(steps=args.steps, batch=args.batch, lr=rate, seed=args.seed + index,
                                     schedule=args.schedule, warmup=args.warmup, draw=args.draw,
                                     loss_positions=args.loss_positions, reinit=args.reinit)
            if args.time_steps and index == 0 and rate == rates[0]:
                full = TrainSettings(**{**vars(settings), "loss_positions": 0})
                record["step_seconds"] = {"all_positions": step_seconds(trunk, layers, hidden, split.train, full,
                                                                        args.time_steps),
                                          f"{args.loss_positions}_positions": step_seconds(
                                              trunk, layers, hidden, split.train, settings, args.time_steps)}
                print(f"seconds per step: {record['step_seconds']}", flush=True)
            path = out / f"pilot-{split.name}-lr{rate:g}.pt"
            fingerprint = expert_fingerprint(layers, settings, split.train) + f";snapshots={snapshots}"
            saved = torch.load(path) if path.exists() else None
            if saved is None or saved["fingerprint"] != fingerprint:
                saved = {"fingerprint": fingerprint,
                         **train_with_snapshots(trunk, layers, split, settings, snapshots, hidden, held_hidden)}
                torch.save(saved, path)
            trained[rate][split.name] = saved
            domain["by_rate"][rate] = {
                "held_out_loss": {s: saved["snapshots"][s]["held_out_loss"] for s in snapshots},
                "train_loss_first_last5": [saved["losses"][0], sum(saved["losses"][-5:]) / len(saved["losses"][-5:])],
                "seconds": round(saved["seconds"], 1), "seconds_per_step": round(saved["seconds"] / args.steps, 2),
                "snapshot_seconds": round(saved["snapshot_seconds"], 1)}
            print(f"[{time.perf_counter() - started:6.0f} s] {split.name} lr {rate:g}: held-out loss dense "
                  f"{dense_loss:.3f} -> " + ", ".join(f"{s}: {saved['snapshots'][s]['held_out_loss']:.3f}"
                                                     for s in snapshots), flush=True)
    features = router_features(trunk, layers, [s.held_out for s in splits])
    act = dense.model.layers[layers[0]].mlp.act_fn
    for rate in rates:
        curve = {}
        for step in snapshots:
            per_layer = {i: expert_differences([tuple(trained[rate][n]["snapshots"][step]["weights"][i]) for n in names],
                                               dense_mlps[i], torch.cat(features[i])[::7], act) for i in layers}
            curve[step] = {"per_layer": per_layer, "pairwise_rel_frobenius_mean_over_layers":
                           sum(d["pairwise_rel_frobenius_mean"] for d in per_layer.values()) / len(layers)}
            values = [d["pairwise_rel_frobenius_mean"] for d in per_layer.values()]
            print(f"lr {rate:g} step {step:4d}: pairwise relative distance {min(values):.4f}-{max(values):.4f} "
                  f"(mean {curve[step]['pairwise_rel_frobenius_mean_over_layers']:.4f}); output cosine "
                  f"{min(d['pairwise_output_cosine_mean'] for d in per_layer.values()):.4f}-"
                  f"{max(d['pairwise_output_cosine_mean'] for d in per_layer.values()):.4f}", flush=True)
        per_step = sum(trained[rate][n]["seconds"] for n in names) / (len(names) * args.steps)
        record["rates"][rate] = {"distance_curve": curve, "seconds_per_step": round(per_step, 2)}
    per_step = sum(r["seconds_per_step"] for r in record["rates"].values()) / len(rates)
    record.update(seconds_per_step=round(per_step, 2),
                  full_build_training_seconds_per_100_steps=round(per_step * 100 * args.full_experts, 0),
                  total_seconds=round(time.perf_counter() - started, 1))
    (out / "pilot.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"{per_step:.2f} s per step; a full build of {args.full_experts} experts costs "
          f"{per_step * 100 * args.full_experts / 60:.0f} min of training per 100 steps per expert", flush=True)


if __name__ == "__main__":
    main()
