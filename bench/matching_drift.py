"""Where output matching helps or hurts: the drift of every layer's output, and every module's output, from
the uncompressed model's, on the calibration windows and on held-out windows.

    python bench/matching_drift.py --model $LRCOMPRESS_SMOLLM2 --layers 10 --ratio 0.2 \
        --configs layer,original --json runs/drift.json

The first ``--layers`` decoder layers of the model (the rest are cut off, so that one configuration takes
minutes) are compressed with ``whiten`` (``--method``) at ``--ratio`` through the real pipeline
(``LayerwisePipeline``) under each configuration: ``layer`` (runtime.target: layer), ``original``
(runtime.target: original), with options joined by ``+``: ``ts``/``nots`` (true_sequential on/off),
``blend=α`` (target_blend), ``damp=λ`` (target_damping). Then the dense and the compressed model see the same windows — the
calibration windows (32 × seq_len from wiki.valid, seed 0: what the fits saw) and held-out windows (the
first ``--heldout`` windows of wiki.test) — and the script prints, per layer, the relative error of the
residual stream ‖h − h_dense‖/‖h_dense‖ (all tokens, and without the first token of each window, whose
massive activations dominate the norm) and, per module, ‖y − y_dense‖/‖y_dense‖ of its outputs: the
quantity output matching minimises, measured directly instead of through the Grams.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from lrcompress.compressor import get_compressor
from lrcompress.data.sources import data_dir, load_text
from lrcompress.data.windows import calibration_windows, evaluation_windows, tokenize
from lrcompress.models import adapter_for
from lrcompress.models.loading import load_model
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage


def truncated(model: nn.Module, layers: int) -> nn.Module:
    """The model with only its first ``layers`` decoder layers (the final norm and head kept)."""
    model.model.layers = nn.ModuleList(list(model.model.layers)[:layers])
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def settings_for(config: str) -> dict:
    """``layer`` or ``original``, then ``+``-joined options: ``ts`` / ``nots`` (true_sequential on / off),
    ``blend=α`` (target_blend), ``damp=λ`` (target_damping); e.g. ``original+nots``, ``original+blend=0.5``."""
    target, *options = config.split("+")
    if target not in ("layer", "original"):
        raise SystemExit(f"unknown target in {config!r}")
    settings: dict = {"target": target}
    for option in options:
        name, _, value = option.partition("=")
        if name in ("ts", "nots"):
            settings["true_sequential"] = name == "ts"
        elif name == "blend":
            settings["target_blend"] = float(value)
        elif name == "damp":
            settings["target_damping"] = float(value)
        else:
            raise SystemExit(f"unknown option {option!r} in {config!r}")
    return settings


class Drift:
    """Running sums of ‖a − b‖² and ‖b‖² per name (b: the dense model's tensor)."""

    def __init__(self) -> None:
        self.num: dict[str, float] = defaultdict(float)
        self.den: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: torch.Tensor, dense: torch.Tensor) -> None:
        self.num[name] += float((value.double() - dense.double()).square().sum())
        self.den[name] += float(dense.double().square().sum())

    def relative(self) -> dict[str, float]:
        return {name: (self.num[name] / self.den[name]) ** 0.5 for name in self.num}


def outputs_of(model: nn.Module, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Every decoder-layer linear's output (by name) and every layer's hidden state for one batch."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.model.layers.named_modules():
        if name.endswith("_proj"):
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name, o)))
    try:
        hidden = model(input_ids=batch, use_cache=False, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return captured, hidden


@torch.no_grad()
def measure(model: nn.Module, dense: nn.Module, windows: torch.Tensor, batch_size: int) -> dict[str, dict[str, float]]:
    modules, stream, stream_rest = Drift(), Drift(), Drift()
    for batch in windows.split(batch_size):
        got, hidden = outputs_of(model, batch)
        want, dense_hidden = outputs_of(dense, batch)
        for name in want:
            modules.add(name, got[name], want[name])
        for i, (h, d) in enumerate(zip(hidden[1:], dense_hidden[1:])):   # output of layer i (the last: normed)
            stream.add(str(i), h, d)
            stream_rest.add(str(i), h[:, 1:], d[:, 1:])
    return {"modules": modules.relative(), "stream": stream.relative(), "stream_without_first": stream_rest.relative()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--configs", default="layer,original")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("runs/drift.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    dense = truncated(loaded.model, args.layers)
    directory = data_dir()
    windows = {
        "calibration": calibration_windows(tokenize(loaded.tokenizer, load_text("wikitext2", "validation", directory).text),
                                           args.calibration, args.seq_len, 0),
        "heldout": evaluation_windows(tokenize(loaded.tokenizer, load_text("wikitext2", "test", directory).text),
                                      args.seq_len, args.heldout),
    }
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for config in args.configs.split(","):
        key = f"{args.method}/{args.ratio}/{args.layers}/{config}"
        if key in results:
            continue
        model = copy.deepcopy(dense)
        cls = get_compressor(args.method)
        stage = Stage(0, cls(cls.Config(ratio=args.ratio)), ["*"], [])
        started = time.perf_counter()
        walk = LayerWalk(model, adapter_for(model), windows["calibration"],
                         PipelineSettings(batch_size=4, **settings_for(config)))
        records = LayerwisePipeline(walk, [stage]).run()
        seconds = time.perf_counter() - started
        row = {"seconds": seconds,
               "records": {r.name: {"relative_error": r.relative_error,
                                    **{k: v for k, v in r.details.items() if isinstance(v, (int, float, str))}}
                           for r in records}}
        for split, batch in windows.items():
            row[split] = measure(model, dense, batch, 4)
        results[key] = row
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"{key}: {seconds:.0f} s; last layer stream drift calibration "
              f"{row['calibration']['stream'][str(args.layers - 1)]:.4f}, held-out "
              f"{row['heldout']['stream'][str(args.layers - 1)]:.4f}", flush=True)
    print_tables(results, args)


def print_tables(results: dict, args) -> None:
    keys = [k for k in results if k.startswith(f"{args.method}/{args.ratio}/{args.layers}/")]
    configs = [k.rsplit("/", 1)[1] for k in keys]
    for measure_name in ("stream", "stream_without_first"):
        print(f"\nResidual stream drift per layer ({measure_name}): calibration / held-out\n")
        print("| layer | " + " | ".join(configs) + " |")
        print("|---|" + "---|" * len(configs))
        for layer in range(args.layers):
            cells = [f"{results[k]['calibration'][measure_name][str(layer)]:.3f} / "
                     f"{results[k]['heldout'][measure_name][str(layer)]:.3f}" for k in keys]
            print(f"| {layer} | " + " | ".join(cells) + " |")
    print("\nModule output error vs the dense model, mean per kind: calibration / held-out\n")
    print("| kind | " + " | ".join(configs) + " |")
    print("|---|" + "---|" * len(configs))
    kinds = sorted({n.split(".")[-1] for n in results[keys[0]]["calibration"]["modules"]})
    for kind in kinds:
        cells = []
        for k in keys:
            pair = []
            for split in ("calibration", "heldout"):
                values = [v for n, v in results[k][split]["modules"].items() if n.endswith(kind)]
                pair.append(f"{sum(values) / len(values):.3f}")
            cells.append(" / ".join(pair))
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
