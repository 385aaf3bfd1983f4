"""Real shapes without downloading them: random-weight checkpoints with the exact decoder-layer shapes of
Llama-3-8B and Qwen3-30B-A3B, compressed through ``runtime.lazy``, measured per layer beside the cost
model's prediction (``lrcompress.pipeline.costs``). Issue 31.

    python bench/eight_b.py build --shape llama3-8b --layers 2 --out DIR      # sharded bf16 safetensors
    python bench/eight_b.py measure --model DIR --method whiten --json OUT.json [--num-samples 4] [--seq-len 512]
    python bench/eight_b.py predict --model DIR --method whiten [--device cuda] # the cost model's JSON, no run
    python bench/eight_b.py predict --recipe RECIPE.yaml [--set KEY=VALUE] [--device cuda]
    python bench/eight_b.py table OUT.json [OUT.json ...]                     # prediction beside measurement

``build`` writes one safetensors shard per decoder layer plus one for the tensors outside them, with the
index, config.json and SmolLM2-135M's tokenizer files (``$LRCOMPRESS_SMOLLM2``): the vocabulary is shrunk
to that tokenizer's 49152 entries (``--vocab``), since the embedding and head are not compressed and only
change the memory outside the layers, which the cost model counts from the config either way. Weights are
N(0, 0.02²) (norms 1), the Hugging Face initializer's scale, so activations stay in range over a few layers.

``measure`` runs the method over every decoder layer (``runtime.lazy: true``, CPU, one thread unless
``--threads``), calibrating on WikiText-2 validation (``$LRCOMPRESS_DATA``) and evaluating perplexity on
``--eval-windows`` test windows (streamed); it records each layer's wall time and the peak resident set
while that layer ran (sampled every 20 ms), the process's peak (VmHWM), the phases' times, and the cost
model's prediction for the same recipe, made from config.json before anything is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
SHAPES = {   # the published configs' layer shapes; vocab is set by --vocab
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                                rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
                                        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                                        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build(args: argparse.Namespace) -> None:
    """Write the random bf16 checkpoint: one shard per decoder layer, one for the rest."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    family, shape = SHAPES[args.shape]
    config = AutoConfig.for_model(family, num_hidden_layers=args.layers, vocab_size=args.vocab, **shape)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "outer"
        groups.setdefault(key, []).append((name, tensor.shape))
    weight_map, total = {}, 0
    for number, (key, names) in enumerate(sorted(groups.items())):
        file = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, size in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(size, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
        print(f"wrote {file}: {key}, {sum(t.numel() for t in tensors.values()) / 1e6:.0f} M parameters", flush=True)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    source = Path(os.environ["LRCOMPRESS_SMOLLM2"])
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out / name)
    print(f"{out}: {args.shape}, {args.layers} layers, vocab {args.vocab}, {total / GIB:.2f} GiB bf16")


class LayerPeaks:
    """The resident set sampled every 20 ms; the highest value while each layer runs, and overall."""

    def __init__(self) -> None:
        self.current: int | None = None
        self.peaks: dict[int, int] = {}
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.overall = 0
        self.running = True
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while self.running:
            value = self.rss()
            self.overall = max(self.overall, value)
            if self.current is not None:
                self.peaks[self.current] = max(self.peaks.get(self.current, 0), value)
            time.sleep(0.02)


def recipe_dict(args: argparse.Namespace, out: Path) -> dict:
    stage = {"method": args.method, **({"ratio": args.ratio} if args.method not in ("gptq", "rtn") else
                                       {"bits": 4, "group_size": 128})}
    if args.targets:
        stage["targets"] = args.targets.split(",")
    return {
        "model": {"path": str(args.model), "dtype": args.dtype},
        "calibration": {"dataset": "wikitext2", "split": "validation", "num_samples": args.num_samples,
                        "seq_len": args.seq_len, "seed": 0},
        "stages": [stage],
        "runtime": {"device": "cpu", "batch_size": args.batch_size, "lazy": True, "threads": args.threads,
                    "check_fit": False},      # measured here whatever MemAvailable says at the start
        "output": {"dir": str(out), "overwrite": True},
        "eval": {"perplexity": [{"dataset": "wikitext2", "split": "test", "seq_len": args.seq_len,
                                 "max_windows": args.eval_windows}], "baseline": False},
    }


def measure(args: argparse.Namespace) -> None:
    """One method over the checkpoint, lazily; the per-layer and whole-run measurements and the prediction."""
    import torch

    from lrcompress.pipeline import PipelineObserver
    from lrcompress.pipeline.memory import image_peak_rss_bytes
    from lrcompress.recipe import parse_recipe
    from lrcompress.runner import run_recipe

    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="lrcompress-8b-"))
    recipe = parse_recipe(recipe_dict(args, out / "run"))
    started_predict = time.perf_counter()
    predicted = getattr(run_recipe(recipe, dry_run=True), "costs", None)   # None before the cost model existed
    predict_seconds = time.perf_counter() - started_predict
    peaks = LayerPeaks()

    class Timing(PipelineObserver):
        def layer_started(self, index: int, modules: int) -> None:
            peaks.current, peaks.started[index] = index, time.perf_counter()

        def layer_done(self, index: int, seconds: float) -> None:
            peaks.seconds[index] = time.perf_counter() - peaks.started.get(index, time.perf_counter())
            peaks.current = None
            print(f"layer {index}: {peaks.seconds[index]:.1f} s, peak RSS {peaks.peaks.get(index, 0) / GIB:.2f} GiB, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)

        def module_done(self, record) -> None:
            print(f"  {record.name} {record.out_features}x{record.in_features}: {record.seconds:.1f} s, "
                  f"RSS now {peaks.rss() / GIB:.2f} GiB", flush=True)

        def phase(self, description: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {description}", flush=True)

    started = time.perf_counter()
    try:
        metrics = run_recipe(recipe, Timing()).metrics
    finally:
        peaks.running = False
        shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - started
    modules = [{"name": r.name, "layer": r.layer, "seconds": r.seconds, "out": r.out_features, "in": r.in_features}
               for r in metrics.modules]
    ppl = next(iter(metrics.eval.perplexity.values()))
    result = {
        "shape": json.loads((Path(args.model) / "config.json").read_text()).get("model_type"),
        "model": str(args.model), "method": args.method, "recipe": recipe_dict(args, Path("<tmp>")),
        "layer_seconds": peaks.seconds, "layer_peak_rss": peaks.peaks, "peak_rss": image_peak_rss_bytes(),
        "sampled_peak_rss": peaks.overall, "run_seconds": seconds, "timing": metrics.timing,
        "modules": modules, "perplexity": ppl.value,
        "predicted": predicted.to_dict() if predicted is not None else None,
        "predict_seconds": predict_seconds, "load": os.getloadavg(), "machine": platform.machine(),
    }
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("layer_seconds", "layer_peak_rss", "peak_rss", "run_seconds")}))


def predict_recipe(recipe_data: dict, device: str):
    """The cost model's prediction for a recipe on ``device`` (cpu or cuda: no GPU needed), from config.json."""
    from lrcompress.models.loading import model_skeleton
    from lrcompress.pipeline.costs import estimate, model_shape
    from lrcompress.pipeline.plan import plan_modules
    from lrcompress.recipe import parse_recipe
    from lrcompress.runner import build_stages

    recipe = parse_recipe(recipe_data)
    skeleton = model_skeleton(recipe.model.path, recipe.model.dtype)
    return estimate(recipe, plan_modules(skeleton, build_stages(recipe)), model_shape(skeleton), device)


def predict(args: argparse.Namespace) -> None:
    """Print the prediction (JSON) for ``measure``'s recipe, or a recipe file, on ``--device``."""
    import yaml

    data = yaml.safe_load(Path(args.recipe).read_text()) if args.recipe else recipe_dict(args, Path("/tmp/unused"))
    for override in args.set or []:
        key, _, value = override.partition("=")
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    costs = predict_recipe(data, args.device)
    print(json.dumps(costs.to_dict(), indent=2))


def table(args: argparse.Namespace) -> None:
    """Prediction beside measurement, one row per (run, phase or layer)."""
    lines = ["| run | quantity | predicted | measured | measured / predicted |", "|---|---|---|---|---|"]
    for path in args.results:
        r = json.loads(Path(path).read_text())
        recipe = {**r["recipe"], "model": {**r["recipe"]["model"], "path": r["model"]}}
        p = predict_recipe(recipe, "cpu").to_dict()       # the committed cost model, never fitted to these runs
        label = f"{r['shape']} {r['method']}"
        layers = sorted(r["layer_seconds"], key=int)
        rows = [("peak host memory, GiB", p["peak_host_bytes"] / GIB, r["peak_rss"] / GIB)]
        rows += [(f"layer {i} time, s", p["layers"][int(i)], r["layer_seconds"][i]) for i in layers]
        compressed = {str(m["layer"]) for m in r["modules"]}          # the run's peak is predicted for these
        rows += [(f"layer {i} peak RSS, GiB", p["peak_host_bytes"] / GIB, r["layer_peak_rss"][i] / GIB)
                 for i in layers if i in r["layer_peak_rss"] and i in compressed]
        rows += [("compress phase, s", p["phases"]["statistics"] + p["phases"]["decompositions"]
                  + p["phases"]["propagation"] + p["phases"]["layer I/O"], r["timing"].get("compress", float("nan"))),
                 ("evaluation, s", p["phases"]["evaluation"], r["timing"].get("eval", float("nan")))]
        for quantity, predicted, measured in rows:
            lines.append(f"| {label} | {quantity} | {predicted:.2f} | {measured:.2f} | {measured / predicted:.2f} |")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "measure", "predict", "table"])
    parser.add_argument("results", nargs="*", help="table: the JSON files measure wrote")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="build")
    parser.add_argument("--layers", type=int, default=2, help="build: decoder layers")
    parser.add_argument("--vocab", type=int, default=49152,
                        help="build: SmolLM2's tokenizer (the real models: 128256, 151936)")
    parser.add_argument("--out", default=None, help="build: the checkpoint directory")
    parser.add_argument("--model", default=None, help="measure/predict: the checkpoint")
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--targets", default=None, help="comma-separated target globs (default: the method's)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="measure: where the measurements go")
    parser.add_argument("--recipe", default=None, help="predict: a recipe file (default: measure's recipe)")
    parser.add_argument("--set", action="append", help="predict: KEY=VALUE override of the recipe (repeatable)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="predict: whose rates")
    args = parser.parse_args()
    needed = {"build": ["out"], "measure": ["model", "json"], "predict": [], "table": ["results"]}[args.command]
    missing = [name for name in needed if not getattr(args, name)]
    if missing or (args.command == "predict" and not (args.model or args.recipe)):
        parser.error(f"{args.command} needs {', '.join('--' + m for m in missing) or '--model or --recipe'}")
    {"build": build, "measure": measure, "predict": predict, "table": table}[args.command](args)

if __name__ == "__main__":
    main()
