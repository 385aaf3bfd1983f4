"""Behaviour check for a refactor: do two trees write the same checkpoint bytes?

    PYTHONPATH=<tree>:<tree>/tests python bench/byte_identity.py tiny MODELS OUT [CASE ...]   # one tree
    python bench/byte_identity.py compare A B                                      # two checkpoints, or two OUTs

``tiny`` builds (once, into MODELS) a tiny random Llama and a tiny Qwen2-MoE with the test helpers, then runs
every case below with whichever tree is first on PYTHONPATH: plain whiten, budget allocation (spectrum,
global, a sparsity knob), the Fisher pre-pass (fwsvd), non-sequential mode, a group of layers (cospadi
``group_size``), lazy mode (the spectra pre-pass from the layer store, streamed evaluation), output matching (whiten, GPTQ, lazy, an MoE block stage
beside a Linear stage).
``compare`` prints, per checkpoint, whether every safetensors file has the same sha256, whether config.json
is equal (``recipe_fingerprint`` apart: it hashes the resolved recipe, output directory included), whether
the other carried files are byte-equal, and whether metrics.json's records, allocation, output-matching
report, compression summary and evaluation are equal once measured times and process memory are masked.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

RUNTIME = {"device": "cpu", "batch_size": 3}
CASES: dict[str, dict[str, Any]] = {
    "whiten-plain": {"stages": [{"method": "whiten", "ratio": 0.2}]},
    "whiten-spectrum": {"stages": [{"method": "whiten", "ratio": 0.3,
                                    "allocation": {"strategy": "spectrum", "floor": 0.2}}]},
    "lord-global": {"stages": [{"method": "lord", "ratio": 0.3, "allocation": {"strategy": "global", "floor": 0.2}}]},
    "cospadi-global": {"stages": [{"method": "cospadi", "ratio": 0.3, "iterations": 1,
                                   "allocation": {"strategy": "global", "floor": 0.2}}]},
    "whiten-original": {"stages": [{"method": "whiten", "ratio": 0.2}], "runtime": {**RUNTIME, "target": "original"}},
    "gptq-original": {"stages": [{"method": "gptq", "bits": 4}], "runtime": {**RUNTIME, "target": "original"}},
    "lazy-original": {"stages": [{"method": "whiten", "ratio": 0.2}],
                      "runtime": {**RUNTIME, "lazy": True, "target": "original"}},
    "fwsvd-fisher": {"stages": [{"method": "fwsvd", "ratio": 0.3}]},
    "whiten-parallel": {"stages": [{"method": "whiten", "ratio": 0.2}], "runtime": {**RUNTIME, "sequential": False}},
    "cospadi-group": {"stages": [{"method": "cospadi", "ratio": 0.3, "iterations": 1, "group_size": 2}]},
    "lazy-spectrum": {"stages": [{"method": "whiten", "ratio": 0.3, "allocation": {"strategy": "spectrum", "floor": 0.2}}],
                      "runtime": {**RUNTIME, "lazy": True}},
    "moe-original": {"model": "moe", "stages": [{"method": "expert_average", "expert_ratio": 0.5},
                                                {"method": "whiten", "ratio": 0.2, "targets": ["*self_attn*"]}],
                     "runtime": {**RUNTIME, "target": "original"}},
}
CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json")


def build_models(directory: Path) -> None:
    import torch
    from helpers import byte_tokenizer, save_tiny
    from moe_helpers import tiny_moe

    if (directory / "calib.txt").is_file():
        return
    save_tiny(directory / "llama", "llama")
    tiny_moe("qwen2_moe").save_pretrained(directory / "moe")
    byte_tokenizer().save_pretrained(directory / "moe")
    words = ("the model compresses layers of weights into factors while the data flows through "
             "every decoder block and the statistics accumulate in float64 ").split()
    picks = torch.randint(0, len(words), (6000,), generator=torch.Generator().manual_seed(0)).tolist()
    (directory / "calib.txt").write_text(" ".join(words[i] for i in picks))


def run_tiny(models: Path, out: Path, only: list[str] | None = None) -> None:
    from lrcompress.recipe import parse_recipe
    from lrcompress.runner import run_recipe
    from tiny_runs import tiny_recipe_dict

    build_models(models)
    for name, case in CASES.items():
        if only and name not in only:
            continue
        extra = dict(case)
        model = models / extra.pop("model", "llama")
        run_recipe(parse_recipe(tiny_recipe_dict(model, models / "calib.txt", out / name, **extra)))
        print("ran", name, flush=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _without_measurements(metrics: dict[str, Any]) -> dict[str, Any]:
    """The deterministic part of metrics.json: wall times and process memory masked."""
    for record in metrics.get("modules", []):
        record.pop("seconds", None)
    if metrics.get("output_matching"):
        metrics["output_matching"].pop("extra_seconds", None)
    for report in ((metrics.get("allocation") or {}).get("prepass") or {}).values():
        if isinstance(report, dict):
            for key in [k for k in report if "seconds" in k or "memory" in k]:
                report.pop(key)
    for result in ((metrics.get("eval") or {}).get("perplexity") or {}).values():
        result.pop("seconds", None)
    return {key: metrics.get(key) for key in ("modules", "allocation", "output_matching", "compression", "eval")}


def compare_checkpoints(a: Path, b: Path) -> bool:
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    same_shards = shards == sorted(p.name for p in b.glob("*.safetensors")) and all(
        _sha(a / name) == _sha(b / name) for name in shards)
    configs = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    fingerprints = []
    for config in configs:
        block = config.get("quantization_config") or config.get("lrcompress") or {}
        fingerprints.append(block.get("provenance", {}).pop("recipe_fingerprint", None))
    same_config = configs[0] == configs[1]
    carried = [name for name in CARRIED if (a / name).is_file() or (b / name).is_file()]
    same_carried = all((a / n).is_file() and (b / n).is_file() and _sha(a / n) == _sha(b / n) for n in carried)
    same_metrics = None
    if (a / "metrics.json").is_file() and (b / "metrics.json").is_file():
        same_metrics = _without_measurements(json.loads((a / "metrics.json").read_text())) == \
            _without_measurements(json.loads((b / "metrics.json").read_text()))
    print(f"| {a.name} | {len(shards)} | {same_shards} | {same_config} | "
          f"{'same' if fingerprints[0] == fingerprints[1] else 'differs'} | {same_carried} | {same_metrics} |")
    return same_shards and same_config and same_carried and same_metrics is not False


def compare(a: Path, b: Path) -> bool:
    print("| checkpoint | safetensors files | all sha256 equal | config.json equal (fingerprint apart) "
          "| recipe_fingerprint | carried files equal | metrics equal (measurements masked) |")
    print("|---|---|---|---|---|---|---|")
    pairs = [(a, b)] if (a / "config.json").is_file() else \
        [(a / name, b / name) for name in sorted(p.name for p in a.iterdir() if (p / "config.json").is_file())]
    same = all([compare_checkpoints(x, y) for x, y in pairs])
    print("\nidentical" if same else "\nDIFFERENT")
    return same


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "tiny":
        run_tiny(Path(args[0]), Path(args[1]), args[2:])
    elif command == "compare":
        sys.exit(0 if compare(Path(args[0]), Path(args[1])) else 1)
    else:
        sys.exit(__doc__)
