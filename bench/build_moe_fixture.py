"""Build the trained MoE fixture: SmolLM2-135M grown into a Qwen2-MoE, Branch-Train-MiX style.

    LRCOMPRESS_SMOLLM2=... LRCOMPRESS_DATA=... python bench/build_moe_fixture.py \\
        [--out DIR] [--train-data wikitext2 --train-split train] [--experts 8] [--layers 22-29] [--steps 60]

With ``--domains code_mbpp,code_humaneval,...`` (issue 32's specialist fixture) the experts' domains are
not k-means clusters of one text but texts that differ by construction (``bench/btx_domains.py``: code,
web, book and question text, two domains each), every domain's windows are split disjointly into
training, router-fit, router-test and held-out windows, the router's top-1 accuracy is reported out of
sample, and every trained expert is checkpointed under ``<out>/experts`` so that an interrupted build
resumes where it stopped (``bench/btx_pilot.py`` prices the build first); ``--domain-lr web_a=5e-4,...`` gives
domains their own peak rate (the others train at ``--lr``, exactly as before, so their saved experts are reused);
``--reinit r`` starts every expert from a Drop-Upcycling copy (``btx.drop_upcycle``: a random fraction r of its
neurons re-initialized) instead of an exact copy of the dense MLP (``--domain-reinit`` per domain), and
``--router-steps N`` trains the assembled MoE's routers on its own next-token loss (``btx.train_routers``).

See ``bench/btx.py`` for the method. The output directory (default: ``$LRCOMPRESS_MOE_FIXTURE``,
else ``<dir of $LRCOMPRESS_SMOLLM2>/<model name>-btx-e<E>``; never inside the repository) holds a plain
Qwen2-MoE checkpoint with its tokenizer and ``fixture_info.json`` (the build settings, timings, domain
sizes, loss curves, router accuracy, expert distances and perplexities). The build is skipped when that
file exists with the same settings (idempotent). Training text: any dataset reference the project reads
(``lrcompress.data.load_text``); it must not be the evaluation split.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from btx import (BuildPaused, BuildSettings, TrainSettings, build,     # bench/btx.py, beside this script
                 build_from_domains, dense_equivalence_error)

from lrcompress.data import data_dir, load_text
from lrcompress.eval import EvalContext, perplexity
from lrcompress.recipe import PerplexitySpec


def layer_list(spec: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return tuple(out)


def default_out(model: str, experts: int) -> Path:
    explicit = os.environ.get("LRCOMPRESS_MOE_FIXTURE")
    if explicit:
        return Path(explicit)
    source = Path(model)
    return source.parent / f"{source.name}-btx-e{experts}"


def parse_domain_values(spec: str | None, flag: str = "--domain-lr", upper: float = math.inf) -> dict[str, float]:
    """``name=value,name=value`` -> {name: value} with 0 < value <= ``upper``; empty for None."""
    out: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, text = part.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not sep or not name.strip() or not 0 < value <= upper or name.strip() in out:
            raise ValueError(f"{flag}: {part!r} is not name=value with 0 < value <= {upper:g} (each name once)")
        out[name.strip()] = value
    return out


def domain_losses(dense, moe, splits, settings: BuildSettings) -> dict[str, dict[str, float]]:
    """Per domain, the held-out next-token loss of dense SmolLM2 and of the MoE (the issue's "the MoE beats
    dense on every domain's held-out text"; the per-expert comparison is the pilot's)."""
    from btx import Trunk, held_out_loss

    first = min(settings.moe_layers)
    return {s.name: {"dense": held_out_loss(Trunk(dense, first), s.held_out),
                     "moe": held_out_loss(Trunk(moe, first), s.held_out)} for s in splits if len(s.held_out)}


# options added after issue 15's build: recorded in fixture_info.json only when not at the parser's default
RECORDED_WHEN_SET = ("schedule", "warmup", "draw", "loss_positions", "domain_lr", "reinit", "domain_reinit",
                     "router_steps", "router_lr", "router_batch")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("LRCOMPRESS_SMOLLM2"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--train-data", default="wikitext2", help="dataset name or local file")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", default="22-29", help="MoE layers (trained), e.g. 22-29 or 20,24,28")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows-per-domain", type=int, default=48)
    parser.add_argument("--router-windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4, help="(peak) rate")
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                        help="cosine: linear warm-up, cosine decay to 0 (issue 32's specialists; btx.train_expert)")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps of --schedule cosine")
    parser.add_argument("--draw", default="random", choices=["random", "epochs"],
                        help="training windows with replacement, or every window once per pass")
    parser.add_argument("--loss-positions", type=int, default=0,
                        help="next-token loss on this many random positions per window (0: all)")
    parser.add_argument("--reinit", type=float, default=0.0,
                        help="Drop-Upcycling: fraction of every expert's neurons re-initialized before training "
                             "(btx.drop_upcycle; 0: plain copies of the dense MLP)")
    parser.add_argument("--domain-reinit", default=None,
                        help="--domains: per-domain --reinit, e.g. code_mbpp=0.02,web_a=0.01 (the others: --reinit)")
    parser.add_argument("--router-steps", type=int, default=0,
                        help="--domains: then train the routers on the MoE's next-token loss for this many steps "
                             "(btx.train_routers, BTX's MiX stage for the routers; 0: the domain classifiers only)")
    parser.add_argument("--router-lr", type=float, default=1e-3, help="peak rate of --router-steps (cosine)")
    parser.add_argument("--router-batch", type=int, default=4, help="windows per step of --router-steps")
    parser.add_argument("--domain-lr", default=None,
                        help="--domains: per-domain peak rates, e.g. web_a=5e-4,book_a=1e-3 (the others: --lr)")
    parser.add_argument("--max-new-experts", type=int, default=None,
                        help="train at most this many experts, then stop (exit 3; a rerun resumes)")
    parser.add_argument("--prefix-cache", default=None, help="directory of cached frozen-prefix outputs")
    parser.add_argument("--domains", default=None, help="comma-separated domains by construction "
                        "(bench/btx_domains.py; --experts must equal their number); default: k-means of --train-data")
    parser.add_argument("--router-test-windows", type=int, default=4, help="--domains: router accuracy windows")
    parser.add_argument("--held-out-windows", type=int, default=8, help="--domains: held-out windows per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=40, help="WikiText-2 test windows of 512 (0: skip)")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def build_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BuildSettings:
    """The build's settings from the arguments; a bad per-domain option is a usage error (exit 2)."""
    try:
        domain_lr = parse_domain_values(args.domain_lr)
        domain_reinit = parse_domain_values(args.domain_reinit, "--domain-reinit", upper=1.0)
    except ValueError as error:
        parser.error(str(error))
    for flag, named in (("--domain-lr", domain_lr), ("--domain-reinit", domain_reinit)):
        if named and not args.domains:
            parser.error(f"{flag} needs --domains")
        if set(named) - set((args.domains or "").split(",")):
            parser.error(f"{flag} names domains not in --domains: {sorted(set(named) - set(args.domains.split(',')))}")
    settings = BuildSettings(experts=args.experts, top_k=args.top_k, moe_layers=layer_list(args.layers),
                             seq_len=args.seq_len, windows_per_domain=args.windows_per_domain,
                             router_windows=args.router_windows, seed=args.seed, domain_lr=domain_lr,
                             domain_reinit=domain_reinit,
                             train=TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                                 schedule=args.schedule, warmup=args.warmup, draw=args.draw,
                                                 loss_positions=args.loss_positions, reinit=args.reinit))
    if args.router_steps:
        if not args.domains:
            parser.error("--router-steps needs --domains (the routers train on the router-fit windows)")
        settings.router_train = TrainSettings(steps=args.router_steps, batch=args.router_batch, lr=args.router_lr,
                                              seed=args.seed, schedule="cosine", warmup=args.router_steps // 10,
                                              draw="epochs", loss_positions=args.loss_positions)
    return settings


def main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    if not args.model:
        sys.exit("give --model or set LRCOMPRESS_SMOLLM2")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else default_out(args.model, args.experts)
    settings = build_settings(args, parser)
    # what does not change the result is not recorded; the new training options only when set (so that
    # issue 15's recorded arguments still match)
    ignored = ("out", "threads", "max_new_experts", "prefix_cache")
    recorded = {k: v for k, v in vars(args).items()
                if k not in ignored and not (k in RECORDED_WHEN_SET and v == parser.get_default(k))}
    info_path = out / "fixture_info.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("arguments") == recorded:
        print(f"{out}: already built with these settings")
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    progress = lambda m: print(f"[{time.perf_counter() - started:6.0f} s] {m}", flush=True)   # noqa: E731
    if args.domains:
        from btx_domains import domain_splits

        splits = domain_splits(data_dir(None, None), args.domains.split(","), tokenizer, args.seq_len,
                               args.windows_per_domain, args.router_windows, args.router_test_windows,
                               args.held_out_windows, args.seed)
        probe = splits[0].train[:1, :128]
        description, fingerprint = f"domains {args.domains}", None
    else:
        source = load_text(args.train_data, args.train_split, data_dir(None, None))
        print(f"training text: {source.description} ({len(source.text)} chars, sha {source.fingerprint})", flush=True)
        probe = tokenizer(source.text[:2000], return_tensors="pt")["input_ids"][:, :128]
        description, fingerprint = source.description, source.fingerprint
    equivalence = dense_equivalence_error(dense, list(settings.moe_layers), settings.experts, settings.top_k, probe)
    print(f"Qwen2-MoE with every expert = the dense MLP: max |logit diff| vs dense {equivalence:.2e}", flush=True)
    if args.domains:
        try:
            moe, info = build_from_domains(dense, splits, settings, progress, checkpoints=out / "experts",
                                           max_new_experts=args.max_new_experts,
                                           prefix_cache=Path(args.prefix_cache) if args.prefix_cache else None)
        except BuildPaused as paused:
            print(f"paused: {paused}; rerun the same command to resume", flush=True)
            sys.exit(3)
        info["held_out_loss"] = domain_losses(dense, moe, splits, settings)
    else:
        moe, info = build(dense, tokenizer, source.text, settings, progress)
    build_seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info.update(arguments=recorded, dense_equivalence_max_logit_diff=equivalence, training_text=description, training_fingerprint=fingerprint,
                build_seconds=round(build_seconds, 1), threads=torch.get_num_threads(),
                machine=platform.machine(), torch=torch.__version__)
    if args.eval_windows:
        for name, model in (("dense", dense), ("moe", moe)):
            result = perplexity(model, tokenizer, PerplexitySpec(max_windows=args.eval_windows),
                                EvalContext(data_dir(None, None)))
            info[f"perplexity_{name}"] = result.value
            print(f"{name}: perplexity {result.value:.3f} ({result.protocol})", flush=True)
        info["perplexity_protocol"] = result.protocol
        info["perplexity_ratio"] = info["perplexity_moe"] / info["perplexity_dense"]
    info["total_seconds"] = round(time.perf_counter() - started, 1)
    info_path.write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "arguments"}, indent=1))


if __name__ == "__main__":
    main()
