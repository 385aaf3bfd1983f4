"""Export compensation paths (EoRA / residual SVD) as a PEFT LoRA adapter over a dense base.

    <out>/base/      a plain HF checkpoint of the *base* compressed model: every compensated module is
                     replaced by its base, and every compressed module is densified (W_c as a float
                     nn.Linear), so any tool loads it;
    <out>/adapter/   adapter_config.json + adapter_model.safetensors, the residual paths as LoRA pairs:
                     lora_A = A (down, r × in), lora_B = B (up, out × r), lora_alpha = r (scaling 1).

Quantized factors are written dequantized (LoRA has no integer format). A compensated module whose
base is itself compensated exports only its outer path; the inner one is folded into the base.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..modules import CompensatedLinear, compressed_modules, dense_weight
from ..modules.surgery import replace_submodule
from .export import densify
from .layout import staged_directory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class PeftExport:
    base_dir: Path
    adapter_dir: Path
    modules: int
    ranks: dict[str, int]


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """LoRA tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``) and module ranks."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, module in compressed_modules(model):
        if not isinstance(module, CompensatedLinear):
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = dense_weight(module.down).detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = dense_weight(module.up).detach().cpu().contiguous()
        ranks[name] = module.rank
    return tensors, ranks


def adapter_config(ranks: dict[str, int], base_path: str) -> dict[str, Any]:
    """A LoRA config whose scaling lora_alpha/r is 1 for every module (rank_pattern for odd ranks)."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False) -> PeftExport:
    """Write ``<out_dir>/base`` and ``<out_dir>/adapter``; ``model`` is densified in place."""
    tensors, ranks = adapter_tensors(model)
    if not ranks:
        raise CheckpointError("the checkpoint has no compensated modules (eora or a residual stage): "
                              "nothing to export as a LoRA adapter; use --dense")
    for name in ranks:
        replace_submodule(model, name, model.get_submodule(name).base)
    densify(model)
    out_dir = Path(out_dir)
    final_base = (out_dir / "base").resolve()
    with staged_directory(out_dir, overwrite) as staging:
        model.save_pretrained(staging / "base")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / "base")
        adapter = staging / "adapter"
        adapter.mkdir()
        save_file(tensors, adapter / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = adapter_config(ranks, str(final_base))
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return PeftExport(out_dir / "base", out_dir / "adapter", len(ranks), ranks)
