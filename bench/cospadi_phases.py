"""Where CoSpaDi's time goes, side by side with whiten, on real SmolLM2 modules and their real Grams.

    python bench/cospadi_phases.py [--model models/smollm2-135m] [--modules model.layers.3.mlp.gate_proj]
                                   [--ratio 0.2] [--configs whiten,cospadi:1,cospadi:4,cospadi:4:float32]
                                   [--num-samples 8] [--threads 1]

The Grams come from ``--num-samples`` calibration windows of WikiText-2 validation (one hooked forward
of the uncompressed model). Each config compresses every listed module through its compressor
contract; the phases are timed by wrapping the functions that do them (whitening, the SVD
initialization, batched OMP, the atom updates, the value refit). A config is ``whiten``,
``compot:ITERATIONS`` or ``cospadi:ITERATIONS[:KSVD_DTYPE[:POWER_STEPS]]`` (e.g. ``cospadi:1::30``, ``cospadi:4:float64``),
and any field after ITERATIONS may be ``OPTION=VALUE`` (e.g. ``cospadi:4:omp_atoms_per_step=8``).
One row per config and module. The relative output error is ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ from the Gram.
"""
from __future__ import annotations

import argparse
import functools
import platform
import time
from collections import defaultdict

import torch

import lrcompress.compressor.compot as compot_module
import lrcompress.compressor.cospadi as cospadi_module
import lrcompress.compressor.dictionary as dictionary_module
import lrcompress.compressor.whiten as whiten_module
from lrcompress.compressor import get_compressor
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.data import calibration_windows, data_dir, load_text, tokenize
from lrcompress.models import load_model
from lrcompress.modules import dense_weight

from grams import collect_grams

PHASES = [("whitening", cospadi_module, "whitening"), ("whitening", whiten_module, "whitening"),
          ("svd init", dictionary_module, "initial_dictionary"), ("sparse coding", dictionary_module, "batched_omp"),
          ("atom updates", dictionary_module, "_update_atoms"), ("refit", cospadi_module, "refit_values"),
          ("procrustes (compot)", compot_module, "orthogonal_dictionary")]


def instrument(seconds: dict[str, float]) -> None:
    """Wrap each phase's function so that its wall time adds up in ``seconds``."""
    for phase, module, name in PHASES:
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args, _original=original, _phase=phase, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_phase] += time.perf_counter() - started

        setattr(module, name, timed)


def parse(config: str) -> tuple[str, dict]:
    """``METHOD[:ITERATIONS[:KSVD_DTYPE[:POWER_STEPS]]]``, where any field after ITERATIONS may instead be
    ``OPTION=VALUE`` for any option of the method's config (e.g. ``cospadi:4:omp_atoms_per_step=8``)."""
    method, *rest = config.split(":")
    if method == "whiten":
        return method, {}
    options: dict = {"iterations": int(rest[0]) if rest else 4}
    positional = ["ksvd_dtype", "power_steps"]
    for field in rest[1:]:
        key, _, value = field.rpartition("=")
        if not key:
            key = positional.pop(0)
        if value:
            options[key] = value
    return method, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--modules", default="model.layers.3.mlp.gate_proj")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--configs", default="whiten,cospadi:1,cospadi:4,cospadi:4:float32")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, "float32")
    text = load_text("wikitext2", "validation", data_dir(None, None)).text
    windows = calibration_windows(tokenize(loaded.tokenizer, text), args.num_samples, 512, 0)
    names = args.modules.split(",")
    stats = collect_grams(loaded.model, names, windows, 4)
    seconds: dict[str, float] = defaultdict(float)
    instrument(seconds)
    rows = []
    for config in args.configs.split(","):
        method, options = parse(config)
        cls = get_compressor(method)
        compressor = cls(cls.Config(ratio=args.ratio, **options))
        for name in names:
            seconds.clear()
            module = loaded.model.get_submodule(name)
            started = time.perf_counter()
            result = compressor.compress(name, module, {"gram": stats[name]})
            total = time.perf_counter() - started
            error = relative_output_error(dense_weight(module).detach(), dense_weight(result.module).detach(),
                                          stats[name].gram(name))
            rows.append((config, name, dict(seconds), total, error))
            print(f"{config} {name}: {total:.1f}s {dict(seconds)} error {error:.5f}", flush=True)
    print(f"\nModules {names} of {args.model}, ratio {args.ratio}, Grams from {args.num_samples}×512 windows; "
          f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}\n")
    phases = list(dict.fromkeys(p for p, _, _ in PHASES))
    print("| config | module | " + " | ".join(phases) + " | total s | × whiten | rel. output error |")
    print("|---|---|" + "---|" * (len(phases) + 3))
    base = {name: total for config, name, _, total, _ in rows if config == "whiten"}
    for config, name, split, total, error in rows:
        ratio = f"{total / base[name]:.1f}×" if name in base else "–"
        print(f"| {config} | {name.removeprefix('model.')} | " + " | ".join(f"{split.get(p, 0.0):.2f}" for p in phases)
              + f" | {total:.2f} | {ratio} | {error:.5f} |")


if __name__ == "__main__":
    main()
