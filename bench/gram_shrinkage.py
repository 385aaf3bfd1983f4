"""Does regularizing the calibration Gram change the out-of-domain gap? (issue 26, docs/generalization.md)

Whitened SVD (SVD-LLM) at one ratio on every decoder-layer linear, with every statistic taken from the
uncompressed model (non-sequential: one Gram pass, then every variant is a cheap re-decomposition), for
several Gram metrics: identity damping G + λ·mean(diag G)·I and shrinkage toward the diagonal
(1 − α)·G + α·Diag(G) (``lrcompress.compressor.linalg.GramMetric``). Each variant is evaluated on
WikiText-2 test and the web-text test file (40 windows of 512 by default), the two-domain protocol.

    .venv/bin/python bench/gram_shrinkage.py --model models/smollm2-135m --calibration wikitext2 \\
        --variants 0:1e-4,0:1e-1,0.1:1e-4,0.5:1e-4,0:1
(``--variants`` lists shrinkage:damping pairs; ``--calibration`` takes ``wikitext2``, ``webtext`` or
``mix``: 16 windows of each, drawn as a recipe mixture draws them.)
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrcompress.compressor.linalg import GramMetric, rank_for_ratio
from lrcompress.data import calibration_windows, data_dir, evaluation_windows, load_text, tokenize
from lrcompress.data.mixture import source_seed

SOURCES = {"wikitext2": ("wikitext2", "validation"), "webtext": ("webtext", "calibration")}


def token_ids(tokenizer, dataset: str, split: str) -> torch.Tensor:
    return tokenize(tokenizer, load_text(dataset, split, data_dir()).text)


def calibration(tokenizer, which: str, samples: int, seq_len: int) -> torch.Tensor:
    if which != "mix":
        return calibration_windows(token_ids(tokenizer, *SOURCES[which]), samples, seq_len, 0)
    halves = [calibration_windows(token_ids(tokenizer, *SOURCES[name]), samples // 2, seq_len, source_seed(0, i))
              for i, name in enumerate(("wikitext2", "webtext"))]
    return torch.cat(halves)


def input_grams(model, linears: dict, windows: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """XᵀX (float64) of every linear's inputs over the windows, through the uncompressed model."""
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def hook(name):
        def observe(_module, args, _output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name].addmm_(x.T, x)
        return observe

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    with torch.no_grad():
        for chunk in windows.split(batch):
            model(input_ids=chunk, use_cache=False)
    for handle in handles:
        handle.remove()
    return grams


def perplexity(model, windows: torch.Tensor, batch: int) -> float:
    nll = []
    with torch.no_grad():
        for chunk in windows.split(batch):
            logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                     reduction="none").view(chunk.shape[0], -1).mean(dim=1)
            nll += loss.double().tolist()
    return math.exp(sum(nll) / len(nll))


def compress(linears: dict, originals: dict, grams: dict, metric: GramMetric, ratio: float) -> None:
    """Every linear ← rank-r whitened SVD of its original weight in ``metric`` (as the whiten method)."""
    for name, module in linears.items():
        white = metric.whiten(grams[name], name)
        weight = originals[name].double()
        rank = rank_for_ratio(*weight.shape, ratio)
        u, s, vh = torch.linalg.svd(weight @ white.factor, full_matrices=False)
        module.weight.data.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank] @ white.inverse).to(module.weight.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", choices=["wikitext2", "webtext", "mix"], default="wikitext2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows per domain")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--variants", default="0:1e-4,0.1:1e-4", help="shrinkage:damping pairs, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = calibration(tokenizer, args.calibration, args.samples, args.seq_len)
    test = {"wikitext2": evaluation_windows(token_ids(tokenizer, "wikitext2", "test"), args.seq_len, args.windows),
            "webtext": evaluation_windows(token_ids(tokenizer, "webtext", "test"), args.seq_len, args.windows)}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    started = time.perf_counter()
    grams = input_grams(model, linears, windows, args.batch_size)
    print(json.dumps({"gram_seconds": round(time.perf_counter() - started, 1), "calibration": args.calibration}))
    for variant in args.variants.split(","):
        shrinkage, damping = (float(v) for v in variant.split(":"))
        started = time.perf_counter()
        compress(linears, originals, grams, GramMetric(damping=damping, shrinkage=shrinkage), args.ratio)
        row = {name: perplexity(model, w, args.batch_size) for name, w in test.items()}
        print(json.dumps({"calibration": args.calibration, "shrinkage": shrinkage, "damping": damping, **row,
                          "seconds": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()
