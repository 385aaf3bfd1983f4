"""LAMBADA's final word, scored as lm-eval scores it, split by what could explain a compressed model's loss.

lm-eval's lambada_openai asks for the last space-separated word of a passage given the rest
(``lrcompress/eval/tasks/lrc_lambada_openai.yaml``): ``acc`` is whether every token of `` word`` is the
greedy argmax, the task's perplexity is exp(−mean log p(word | passage)). The passages were chosen so that
the word is guessable from the whole passage but not from its last sentence (Paperno et al. 2016), and
most targets already occur earlier in the passage: the task leans on copying from context, which in a
transformer is the attention's job (induction heads, Olsson et al. 2022). This script scores the same
documents the same way (lm-eval's own ``_encode_pair`` tokenizes them) for the dense model and each
checkpoint, and splits them by

- whether the target word already occurs in the passage (copy) or not,
- the dense model's rank of the target's first token (1: the dense model gets it; 2–10; > 10),

and reports, per model, how often its greedy first token is a token of the passage (its "copy rate"), the
KL(dense ‖ model) at the target position against the mean over the passage's positions, the model's entropy
there and over the passage (flatter or sharper than dense: what a KL objective does to it), and an induction
probe on no task text at all: random token strings repeated once, the loss and the top-1 accuracy on the
repeat (a model that copies from context predicts the repeat almost perfectly).
Nothing is written except ``--json``. docs/generalization.md, bench/history/zeroshot-issue-26.md.

    LRCOMPRESS_DATA=<data> python bench/lambada_probe.py --dense models/smollm2-135m runs/demo runs/aim
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lrcompress.data.sources import data_dir
from lrcompress.eval.task_data import task_docs
from lrcompress.models.loading import load_model


@dataclass
class Passage:
    """One LAMBADA document as lm-eval encodes it."""
    context: list[int]
    target: list[int]
    in_context: bool        # the target word (case and punctuation aside) occurs earlier in the passage


@dataclass
class Score:
    """One model's answer on one passage."""
    logp: float             # Σ log p(target tokens | context): lm-eval's loglikelihood
    greedy: bool            # every target token is the argmax: lm-eval's acc
    first_rank: int         # rank of the target's first token (1 = argmax)
    copies: bool            # the argmax at the first target position is a token of the context
    kl_target: float        # KL(dense ‖ model) at the first target position (0 for the dense model)
    kl_passage: float       # mean KL(dense ‖ model) over the context's positions
    entropy_target: float   # the model's entropy at the first target position (nats)
    entropy_passage: float  # its mean entropy over the context's positions: flatter or sharper than dense


def _word(text: str) -> str:
    return re.sub(r"[^\w]", "", text.lower())


def passages(lm, docs: list[dict]) -> list[Passage]:
    """The documents as lm-eval's task YAML splits them, tokenized by lm-eval's ``_encode_pair``."""
    out = []
    for doc in docs:
        words = doc["text"].split(" ")
        context, target = " ".join(words[:-1]), " " + words[-1]
        ctx, cont = lm._encode_pair(context, target)
        out.append(Passage(ctx, cont, _word(words[-1]) in {_word(w) for w in words[:-1]}))
    return out


@torch.no_grad()
def log_probs(model, passage: Passage, max_length: int) -> torch.Tensor:
    """log p(next token) at every position of context + target[:-1] (lm-eval truncates from the left)."""
    ids = (passage.context + passage.target)[-(max_length + 1):][:-1]
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return F.log_softmax(logits.double(), dim=-1)


def _at_target_and_over_context(per_position: torch.Tensor, n: int) -> tuple[float, float]:
    """(the value at the first target position, its mean over the context's positions; NaN without any)."""
    context = per_position[:-n]
    return float(per_position[-n]), float(context.mean()) if context.numel() else float("nan")


def score(logp: torch.Tensor, passage: Passage, dense: torch.Tensor | None) -> Score:
    """``logp``: one model's log-probabilities on the passage; ``dense``: the dense model's (None: it is dense)."""
    n = len(passage.target)
    tail, tokens = logp[-n:], torch.tensor(passage.target)
    first = tail[0]
    kl = (0.0, 0.0) if dense is None else _at_target_and_over_context((dense.exp() * (dense - logp)).sum(-1), n)
    entropy = _at_target_and_over_context(-(logp.exp() * logp).sum(-1), n)
    return Score(float(tail.gather(1, tokens[:, None]).sum()), bool((tail.argmax(-1) == tokens).all()),
                 int((first > first[passage.target[0]]).sum()) + 1, int(first.argmax()) in set(passage.context),
                 *kl, *entropy)


@torch.no_grad()
def induction(model, vocab: int, count: int, length: int, seed: int = 0) -> tuple[float, float]:
    """(mean NLL, top-1 accuracy) on the second copy of ``count`` random strings of ``length`` tokens, each
    shown twice in a row: what copying from context alone predicts."""
    generator = torch.Generator().manual_seed(seed)
    nll = hits = 0.0
    for _ in range(count):
        half = torch.randint(1000, vocab, (length,), generator=generator)
        ids = torch.cat([half, half])[None]
        logp = F.log_softmax(model(input_ids=ids).logits[0, length - 1:-1].double(), dim=-1)
        nll += float(-logp.gather(1, half[:, None]).mean())
        hits += float((logp.argmax(-1) == half).double().mean())
    return nll / count, hits / count


def summarize(scores: list[Score], rows: list[bool]) -> dict[str, float]:
    chosen = [s for s, keep in zip(scores, rows) if keep]
    if not chosen:
        return {"n": 0, "acc": float("nan"), "logp": float("nan")}
    return {"n": len(chosen), "acc": sum(s.greedy for s in chosen) / len(chosen),
            "logp": sum(s.logp for s in chosen) / len(chosen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="compressed checkpoints (lrcompress run outputs)")
    parser.add_argument("--dense", required=True, help="the uncompressed model")
    parser.add_argument("--limit", type=int, default=200, help="first documents, as lm-eval's --limit")
    parser.add_argument("--induction", type=int, nargs=2, default=(16, 64), metavar=("COUNT", "LENGTH"))
    parser.add_argument("--json", type=Path, help="write every per-passage score here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = data_dir()
    if directory is None:
        raise SystemExit("set LRCOMPRESS_DATA (the directory holding lambada-openai/lambada_test.jsonl)")
    from lrcompress.eval.shared_context import SharedContextLM

    dense = load_model(args.dense)
    lm = SharedContextLM(pretrained=dense.model, tokenizer=dense.tokenizer, batch_size=1, device="cpu")
    docs, _ = task_docs("lambada_openai", directory)
    items = passages(lm, docs[:args.limit])
    dense_logp = [log_probs(dense.model, p, lm.max_length).float() for p in items]    # kept for the KL
    vocab = dense.model.config.vocab_size
    results: dict[str, dict] = {}
    for name in ["dense"] + [str(c) for c in args.checkpoints]:
        started = time.perf_counter()
        model = dense.model if name == "dense" else load_model(name).model
        scores = [score(dl.double(), p, None) if name == "dense" else
                  score(log_probs(model, p, lm.max_length), p, dl.double()) for p, dl in zip(items, dense_logp)]
        results[name] = {"scores": scores, "induction": induction(model, vocab, *args.induction),
                         "seconds": time.perf_counter() - started}
    base = results["dense"]["scores"]
    splits = {"all": [True] * len(items), "target in passage": [p.in_context for p in items],
              "target not in passage": [not p.in_context for p in items],
              "dense rank 1": [s.first_rank == 1 for s in base],
              "dense rank 2-10": [1 < s.first_rank <= 10 for s in base],
              "dense rank > 10": [s.first_rank > 10 for s in base]}
    print(f"{len(items)} passages; acc / mean target log-prob (nats) per split")
    print("| model | " + " | ".join(f"{k} (n={sum(v)})" for k, v in splits.items()) + " |")
    print("|---|" + "---|" * len(splits))
    for name, result in results.items():
        cells = [summarize(result["scores"], rows) for rows in splits.values()]
        print(f"| {name} | " + " | ".join(f"{c['acc']:.3f} / {c['logp']:.2f}" for c in cells) + " |")
    print("\n| model | target ppl | copy rate (argmax in passage) | KL at target | mean KL over passage | "
          "entropy at target | mean entropy over passage | induction NLL | induction top-1 | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        s = result["scores"]
        ppl = math.exp(-sum(x.logp for x in s) / len(s))
        nll, top1 = result["induction"]
        print(f"| {name} | {ppl:.1f} | {sum(x.copies for x in s) / len(s):.3f} | "
              f"{sum(x.kl_target for x in s) / len(s):.3f} | {sum(x.kl_passage for x in s) / len(s):.3f} | "
              f"{sum(x.entropy_target for x in s) / len(s):.3f} | {sum(x.entropy_passage for x in s) / len(s):.3f} | "
              f"{nll:.3f} | {top1:.3f} | {result['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"in_context": [p.in_context for p in items],
                                         "models": {n: {"induction": r["induction"],
                                                        "scores": [asdict(x) for x in r["scores"]]}
                                                    for n, r in results.items()}}))


if __name__ == "__main__":
    main()
