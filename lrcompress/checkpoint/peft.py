"""Export compensation paths (EoRA / residual SVD) as a PEFT LoRA adapter over a dense base.

    <out>/base/      the *base* compressed model (every compensated module replaced by its base): in
                     the compressed-tensors format when the bases are all rtn/gptq quantized linears
                     (transformers + compressed-tensors load it, vLLM serves it), else densified (W_c
                     as a float nn.Linear), so any tool loads it;
    <out>/adapter/   written by peft itself (get_peft_model + save_pretrained): the residual paths as
                     LoRA pairs, lora_A = A (down, r × in), lora_B = B (up, out × r), lora_alpha = r
                     (scaling 1).

Quantized factors are written dequantized (LoRA has no integer format). A compensated module whose
base is itself compensated exports only its outer path; the inner one is folded into the base.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..modules import CompensatedLinear, compressed_modules, dense_weight
from ..modules.surgery import replace_submodule
from .compressed_tensors import quantized_targets, write_compressed_tensors
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


def lora_config(ranks: dict[str, int], base_path: str):
    """peft's LoraConfig with scaling lora_alpha/r = 1 for every module (rank_pattern for odd ranks)."""
    from peft import LoraConfig

    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    return LoraConfig(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=dict(pattern),
                      target_modules=sorted(ranks), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_path, inference_mode=True)


def quantized_base(model: nn.Module) -> bool:
    """Whether the base (compensated modules replaced by their bases) is all rtn/gptq quantized linears
    that compressed-tensors holds, and the package is there to write them."""
    try:
        import compressed_tensors  # noqa: F401
        quantized_targets(model)
    except (ImportError, CheckpointError):
        return False
    return True


def write_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], ranks: dict[str, int], directory: Path,
                  base_path: str) -> None:
    """The LoRA adapter written by peft itself: ``model`` (dense) wrapped by ``get_peft_model``, the
    compensation factors loaded as its LoRA weights, ``save_pretrained``."""
    try:
        from peft import get_peft_model, set_peft_model_state_dict
    except ImportError as error:
        raise CheckpointError(f"the --peft export needs the `peft` package (pip install peft): {error}") from None
    model.name_or_path = base_path          # what peft records as the adapter's base model
    wrapped = get_peft_model(model, lora_config(ranks, base_path))
    result = set_peft_model_state_dict(wrapped, tensors)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"peft did not take the adapter tensors {result.unexpected_keys[:5]}")
    wrapped.save_pretrained(directory)


def export_peft(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False,
                runtime: str = "transformers") -> PeftExport:
    """Write ``<out_dir>/base`` and ``<out_dir>/adapter``; ``model`` is changed in place. The base is the
    compressed-tensors export of the quantized bases (zero points shaped for ``runtime``) when they all are
    rtn/gptq quantized linears (and the package is installed), else a dense float checkpoint."""
    tensors, ranks = adapter_tensors(model)
    if not ranks:
        raise CheckpointError("the checkpoint has no compensated modules (eora or a residual stage): "
                              "nothing to export as a LoRA adapter; use --dense")
    for name in ranks:
        replace_submodule(model, name, model.get_submodule(name).base)
    out_dir = Path(out_dir)
    final_base = (out_dir / "base").resolve()
    with staged_directory(out_dir, overwrite) as staging:
        (staging / "base").mkdir()
        if quantized_base(model):
            write_compressed_tensors(model, tokenizer, staging / "base", runtime)
            densify(model)
        else:
            densify(model)
            model.save_pretrained(staging / "base")
            if tokenizer is not None:
                tokenizer.save_pretrained(staging / "base")
        write_adapter(model, tensors, ranks, staging / "adapter", str(final_base))
    return PeftExport(out_dir / "base", out_dir / "adapter", len(ranks), ranks)
