"""Block refinement of a compressed checkpoint (lrcompress/pipeline/refine.py), measured on two domains.

Post hoc: it refines a checkpoint that was compressed without refinement. The recipe option
``runtime.refine`` (docs/refine.md) refines inside the run instead, so that every later layer is compressed
on the refined layers' outputs; bench/history/refine-issue-26.md compares the two.

    LRCOMPRESS_DATA=... python bench/refine.py --model models/smollm2-135m --compressed runs/whiten-0.2 \
        --calibration wikitext2,webtext --epochs 8 --out runs/refine/mix-e8.json [--save runs/whiten-0.2-refined]
    python bench/refine.py --model models/smollm2-135m --compressed runs/whiten-0.2 --evaluate-only \
        --dense --out runs/refine/before.json         # dense and unrefined numbers, same protocol

Loads the original model and a checkpoint written by ``lrcompress run`` (``lrcompress.load``), captures
both models' layer-0 inputs on the calibration windows (32 × 512, seed 0, as recipes/whiten.yaml), then
walks the decoder layers with two streams side by side: the original stream X_l → f_l(X_l) and the
compressed stream X̂_l, which goes through compressed layer l only after it has been refined toward
f_l(X_l) (``refine_layer``). Then the refined model is evaluated on WikiText-2 test and the web-text test
file (40 windows of 512 each, ``lrcompress.eval.perplexity``). Refinement time and the process's peak
resident set are measured before any evaluation runs (an evaluation's logits would set the peak).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

import lrcompress
from lrcompress.checkpoint.writer import write_checkpoint
from lrcompress.data import calibration_windows, load_text, tokenize
from lrcompress.eval.perplexity import EvalContext, perplexity
from lrcompress.models import adapter_for
from lrcompress.models.capture import capture_layer_inputs, forward_layer
from lrcompress.models.loading import load_ready
from lrcompress.pipeline.refine import RefineConfig, refine_layer
from lrcompress.recipe import PerplexitySpec

CPU = torch.device("cpu")


def data_dir() -> Path:
    return Path(os.environ.get("LRCOMPRESS_DATA", "data"))


def domains() -> dict[str, PerplexitySpec]:
    """The two-domain protocol of issue 26: WikiText-2 test and the web-text test file, 40 × 512 each."""
    return {"wikitext2": PerplexitySpec(dataset="wikitext2", split="test", seq_len=512, max_windows=40),
            "webtext": PerplexitySpec(dataset=str(data_dir() / "webtext" / "webtext.test.jsonl"), split="test",
                                      seq_len=512, max_windows=40, text_column="text")}


def calibration(names: str, tokenizer, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows from each comma-separated source, interleaved window by window (so that every
    batch, the held-out ones too, mixes the sources)."""
    parts = [source_windows(name, tokenizer, samples, seq_len, seed) for name in names.split(",")]
    return torch.stack(parts, dim=1).flatten(0, 1)


def source_windows(name: str, tokenizer, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Calibration windows as the recipe path makes them: ``wikitext2`` validation, ``webtext`` (the
    calibration file, disjoint by document from the test file) or a file path."""
    if name == "wikitext2":
        source = load_text("wikitext2", "validation", data_dir())
    else:
        path = data_dir() / "webtext" / "webtext.calibration.jsonl" if name == "webtext" else Path(name)
        source = load_text(str(path), "validation", data_dir(), text_column="text")
    return calibration_windows(tokenize(tokenizer, source.text), samples, seq_len, seed)


def evaluate(model, tokenizer, batch_size: int) -> dict[str, float]:
    context = EvalContext(data_directory=data_dir(), batch_size=batch_size)
    return {name: perplexity(model, tokenizer, spec, context).value for name, spec in domains().items()}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # Linux reports KiB


def refine_model(original, compressed, windows: torch.Tensor, batch_size: int, config: RefineConfig,
                 layers: int | None = None) -> dict:
    """Refine the first ``layers`` (all by default) decoder layers of ``compressed`` in place (module
    docstring); per-layer reports."""
    adapter_o, adapter_c = adapter_for(original), adapter_for(compressed)
    started = time.perf_counter()
    x = capture_layer_inputs(original, adapter_o, windows, batch_size, CPU, CPU)
    x_hat = capture_layer_inputs(compressed, adapter_c, windows, batch_size, CPU, CPU)
    reports = []
    for index, (layer_o, layer_c) in enumerate(zip(adapter_o.decoder_layers(original),
                                                   adapter_c.decoder_layers(compressed))):
        if layers is not None and index >= layers:
            break
        with torch.no_grad():
            y = forward_layer(layer_o, x, CPU, CPU)
        report = refine_layer(layer_c, x_hat, y.hidden, config, name=f"{adapter_c.layers}.{index}")
        with torch.no_grad():
            x_hat = forward_layer(layer_c, x_hat, CPU, CPU)
        x = y
        reports.append(report.model_dump())
        print(f"{report.layer}: mean target² {report.target_mean_square:.4g}; "
              f"train {report.train_before:.4g} → {report.train_after:.4g}, held-out "
              f"{report.holdout_before:.4g} → {report.holdout_after:.4g}{' (reverted)' if report.reverted else ''}, "
              f"{report.seconds:.1f}s", flush=True)
    return {"seconds": time.perf_counter() - started, "peak_rss_gib": peak_rss_gib(), "layers": reports}


def _named(paths: list[Path]) -> dict[str, float]:
    """{wikitext2, webtext} → perplexity, read from metrics.json / `lrcompress eval --output` files."""
    values = {}
    for path in paths:
        for key, result in json.loads(path.read_text())["eval"]["perplexity"].items():
            values["webtext" if "webtext" in key else "wikitext2"] = result["value"]
    return values


def table(records: list[Path], dense: dict[str, float], before: dict[str, float]) -> str:
    """The markdown table of refined runs (their JSON records) against the dense and unrefined numbers."""
    def cells(values: dict[str, float]) -> str:
        return " | ".join(f"{values[d]:.2f} ({values[d] / dense[d]:.2f}×)" for d in ("wikitext2", "webtext"))

    lines = [("| row | calibration | epochs × steps | lr | trained | loss | WikiText-2 test | web-text test | "
              "refine s | peak RSS GiB | layers reverted |"), "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | | | | | | {dense['wikitext2']:.2f} | {dense['webtext']:.2f} | | | |",
             f"| whiten 0.2 | wikitext2 | – | | | | {cells(before)} | | | |"]
    for path in records:
        r = json.loads(path.read_text())
        c, layers = r["config"], r["refine"]["layers"]
        lines.append(f"| {path.stem} | {r['args']['calibration']} | {c['epochs']} × {layers[0]['steps'] // c['epochs']} | "
                     f"{c['lr']:g} | {','.join(c['parameters'])} | {c['loss']} | {cells(r['refined'])} | "
                     f"{r['refine']['seconds']:.0f} | {r['refine']['peak_rss_gib']:.2f} | "
                     f"{sum(x['reverted'] for x in layers)}/{len(layers)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the original (dense) model directory")
    parser.add_argument("--compressed", required=True, help="a run directory written by `lrcompress run`")
    parser.add_argument("--calibration", default="wikitext2",
                        help="wikitext2, webtext or a .txt/.jsonl path; several, comma-separated: a mixture")
    parser.add_argument("--samples", type=int, default=32, help="windows from each calibration source")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2, help="windows per captured batch = per Adam step")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--parameters", default="factors", help="comma-separated: factors, norms, biases")
    parser.add_argument("--loss", choices=["mse", "token_relative"], default="mse")
    parser.add_argument("--holdout", type=float, default=0.125)
    parser.add_argument("--layers", type=int, help="refine only the first N layers, no evaluation (a sweep)")
    parser.add_argument("--evaluate-only", action="store_true", help="no refinement: the checkpoint as it is")
    parser.add_argument("--dense", action="store_true", help="also evaluate the original model")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--save", type=Path, help="write the refined checkpoint here (a new directory)")
    parser.add_argument("--out", type=Path, help="the JSON record of this run")
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of these JSON records and stop "
                        "(dense and unrefined numbers from --dense-json / --before-json, `lrcompress eval` outputs)")
    parser.add_argument("--dense-json", type=Path, nargs="+", default=[])
    parser.add_argument("--before-json", type=Path, help="a metrics.json of the unrefined run")
    args = parser.parse_args()
    if args.table:
        print(table(args.table, _named(args.dense_json), _named([args.before_json])))
        return
    if args.out is None:
        parser.error("--out is required")

    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    compressed = lrcompress.load(args.compressed)
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "load": os.getloadavg()}
    if args.dense:
        original = load_ready(args.model)
        record["dense"] = evaluate(original, tokenizer, args.eval_batch_size)
        print("dense", record["dense"], flush=True)
    if args.evaluate_only:
        record["compressed"] = evaluate(compressed, tokenizer, args.eval_batch_size)
        print("compressed", record["compressed"], flush=True)
    else:
        original = load_ready(args.model)
        config = RefineConfig(epochs=args.epochs, lr=args.lr, parameters=args.parameters.split(","),
                              loss=args.loss, holdout=args.holdout)
        windows = calibration(args.calibration, tokenizer, args.samples, args.seq_len, 0)
        record["config"] = config.model_dump()
        record["refine"] = refine_model(original, compressed, windows, args.batch_size, config, args.layers)
        print(f"refined in {record['refine']['seconds']:.0f}s, peak RSS {record['refine']['peak_rss_gib']:.2f} GiB",
              flush=True)
        if args.layers is None:
            record["refined"] = evaluate(compressed, tokenizer, args.eval_batch_size)
            print("refined", record["refined"], flush=True)
        if args.save:
            args.save.mkdir(parents=True)
            write_checkpoint(compressed, tokenizer, args.save, {"refined_from": str(args.compressed),
                                                                 "refine": record["config"],
                                                                 "calibration": args.calibration},
                             source=args.compressed)
    record["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
