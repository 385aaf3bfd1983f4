"""Post hoc ``runtime.distill`` on a written checkpoint: the learning-rate sweep and the third-text check.

The same function as the recipe option (``lrcompress.pipeline.distill.distill_model``) applied to a checkpoint
that ``lrcompress run`` wrote without it: the calibration windows are the checkpoint's recipe's (same mixture,
same seed), the teacher states come from the original model. For every lr it reports the held-out KL curve
and, before and after, the per-token KL(original ‖ compressed) on texts the calibration never saw: the first
``--windows`` windows of LAMBADA's passages and of MBPP's code (``<data dir>/lambada-openai``, ``code``), and of
the two evaluation splits. Nothing is written. docs/distill.md, bench/history/distill-issue-26.md.

    LRCOMPRESS_DATA=<data> python bench/distill.py runs/demo --original models/smollm2-135m --lr 1e-5 3e-5 1e-4
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import lrcompress
from lrcompress.data import data_dir, tokenize
from lrcompress.data.mixture import calibration_set
from lrcompress.data.sources import load_text
from lrcompress.data.windows import evaluation_windows
from lrcompress.models import adapter_for
from lrcompress.models.loading import load_model
from lrcompress.pipeline.distill import DistillConfig, distill_model, kl_per_token, teacher_states
from lrcompress.recipe import load_recipe
THIRD_TEXTS = {"lambada": ("lambada-openai/lambada_test.jsonl", "text"), "code": ("code/mbpp.jsonl", "code"),
               "wikitext2-test": ("wikitext2", "text"), "webtext-test": ("webtext", "text"),
               "lambada-passages": (), "webtext-short": ()}


def text_windows(tokenizer, name: str, directory: Path, seq_len: int, count: int) -> list[torch.Tensor]:
    """The first ``count`` sequences of one of ``THIRD_TEXTS``: windows of ``seq_len`` (documents joined as the
    data layer joins them); ``lambada-passages``: whole passages, each from position 0 (lm-eval's setting);
    ``webtext-short``: the first 64 tokens of the web-text test windows, each from position 0."""
    if name == "lambada-passages":
        rows = [json.loads(line) for line in (directory / THIRD_TEXTS["lambada"][0]).read_text().splitlines()[:count * 8]]
        return [tokenize(tokenizer, row["text"]).view(1, -1) for row in rows]
    if name == "webtext-short":
        return [w[:, :64] for w in text_windows(tokenizer, "webtext-test", directory, seq_len, count * 8)]
    dataset, column = THIRD_TEXTS[name]
    if name.endswith("-test"):
        source = load_text(dataset, "test", directory, text_column=column)
    else:
        source = load_text(str(directory / dataset), "test", directory, text_column=column)
    return list(evaluation_windows(tokenize(tokenizer, source.text), seq_len, count, name).split(1))


@torch.no_grad()
def kl_against(student, teacher: list[torch.Tensor], sequences: list[torch.Tensor]) -> float:
    """Per-token KL(original ‖ ``student``) over ``sequences`` (tokens weighted alike), one at a time; ``teacher``:
    the original model's last layer outputs per sequence (its head is the student's: frozen)."""
    adapter, total = adapter_for(student), 0.0
    for ids, states in zip(sequences, teacher):
        reference = adapter.head_logits(student, states)
        total += float(kl_per_token(student(input_ids=ids, use_cache=False).logits, reference)) * ids.numel()
    return total / sum(ids.numel() for ids in sequences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--original", required=True)
    parser.add_argument("--lr", type=float, nargs="*", default=[2e-5],
                        help="learning rates to try (none: only the checkpoint's KL on the texts)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--windows", type=int, default=8, help="windows of each third text")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="other checkpoints whose KL on the same texts is reported (e.g. distilled runs)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")     # the per-step lines
    recipe = load_recipe(args.checkpoint / "recipe.yaml", [f"model.path={args.original}"])
    directory = data_dir(None, recipe.data_dir)
    original = load_model(args.original, "float32").model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    windows = calibration_set(recipe.calibration, tokenizer, directory).windows
    if args.lr:
        started = time.perf_counter()
        teacher = teacher_states(original, adapter_for(original), windows, recipe.runtime.batch_size,
                                 torch.device("cpu"))
        print(f"teacher states: {len(windows)} windows, {time.perf_counter() - started:.1f}s", flush=True)
    texts = {name: text_windows(tokenizer, name, directory, recipe.calibration.seq_len, args.windows)
             for name in THIRD_TEXTS}
    references = {name: [teacher_states(original, adapter_for(original), ids, 1, torch.device("cpu"))
                         for ids in sequences] for name, sequences in texts.items()}
    compressed = lrcompress.load(args.checkpoint, kernels=False).eval()
    results = {"before": {name: kl_against(compressed, references[name], w) for name, w in texts.items()}}
    print("before", json.dumps(results["before"]), flush=True)
    for other in args.compare:
        model = lrcompress.load(other, kernels=False).eval()
        results[str(other)] = {name: kl_against(model, references[name], w) for name, w in texts.items()}
        print(other, json.dumps(results[str(other)]), flush=True)
    for lr in args.lr:
        model = copy.deepcopy(compressed)
        report = distill_model(model, adapter_for(model), windows, teacher,
                               DistillConfig(epochs=args.epochs, lr=lr, seed=recipe.seed))
        after = {name: kl_against(model, references[name], w) for name, w in texts.items()}
        results[f"lr={lr:g}"] = {"report": report.model_dump(), "after": after}
        print(f"lr={lr:g}", json.dumps({"held_out": [report.held_out_before, report.held_out_after],
                                        "kept_step": report.kept_step, "steps": report.steps,
                                        "curve": report.curve, "seconds": round(report.seconds, 1), "after": after}),
              flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
