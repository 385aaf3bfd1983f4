"""Export rtn/gptq checkpoints in the compressed-tensors "pack-quantized" format (transformers loads it
with the ``compressed-tensors`` package; vLLM serves the format).

lrcompress stores unsigned codes q ∈ [0, 2^b) and zero points z with W = (q − z)·s per group of
consecutive inputs; compressed-tensors stores signed codes and zero points, W = (q' − z')·s with
q' = q − 2^(b−1), z' = z − 2^(b−1): the same weights, re-centred. Its own ``pack_to_int32`` packs them
(codes along the inputs, zero points along the outputs) and its own ``QuantizationConfig`` writes the
``quantization_config`` block; one config group per (bits, group size) combination, targeting the
modules by name. What it cannot express is refused: act-order checkpoints (the permuted column order),
and modules that are not plain quantized linears (low-rank, sparse, compensated: an EoRA run exports
its base this way plus a PEFT adapter, see ``peft.py``). A ragged last group is written with smaller
groups that repeat its scale (:func:`format_group_size`).

Zero points are laid out for one loader (``runtime``), because the two that read the format disagree on
their shape: vLLM reads the packed shape compressed-tensors' own compressor writes, (⌈outputs/8⌉ ×
groups) at 4 bits, and asserts it; transformers 5.x with compressed-tensors 0.20 allocates the parameter
unpacked (outputs × groups) and refuses any other shape, though it reads only the packed rows. So
``transformers`` pads the packed rows to that shape, ``vllm`` writes them as packed (docs/vllm.md).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError
from ..modules import QuantizedLinear, compressed_modules
from .export import forget_compression
from .layout import CONFIG_NAME, WEIGHTS_NAME, staged_directory
from .writer import unique_state_dict

FORMAT = "pack-quantized"
RUNTIMES = ("transformers", "vllm")     # whose zero-point shape is written (module docstring)
FACTORED_KINDS = ("low_rank", "sparse_dict")   # may hold quantized factors (apply_to: factors): refused by name


def _require_compressed_tensors():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as error:
        raise CheckpointError("the compressed-tensors export needs the `compressed-tensors` package "
                              f"(pip install compressed-tensors): {error}") from None
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def quantized_targets(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The quantized linears of ``model``; refuses modules or options the format cannot hold."""
    found: dict[str, QuantizedLinear] = {}
    for name, module in compressed_modules(model):
        if module.kind in FACTORED_KINDS and any(isinstance(inner, QuantizedLinear) for inner in module.modules()):
            raise CheckpointError(f"module {name} is {module.kind} with quantized factors: compressed-tensors has no "
                                  "layout for a quantized factor pair or quantized dictionary values (it quantizes "
                                  "one weight per linear); export it with `lrcompress export --dense` instead")
        if not isinstance(module, QuantizedLinear):
            raise CheckpointError(f"module {name} is {module.kind}: the compressed-tensors export takes rtn/gptq "
                                  "quantized linears only (an EoRA run: export its base with --peft)")
        if module.act_order:
            raise CheckpointError(f"module {name} was quantized with act_order: its permuted column order has no "
                                  "compressed-tensors equivalent here; re-run gptq with act_order: false")
        found[name] = module
    if not found:
        raise CheckpointError("the checkpoint has no quantized modules: nothing to export as compressed-tensors")
    return found


def format_group_size(module: QuantizedLinear) -> int:
    """The group size written: compressed-tensors needs groups that tile the inputs exactly, so a
    ragged last group (576 inputs in groups of 128) is expressed with groups of gcd(group, inputs) = 64
    that repeat their group's scale and zero point — the same weights."""
    return math.gcd(module.group_size, module.in_features)


def module_tensors(name: str, module: QuantizedLinear, pack_to_int32, runtime: str = "transformers"
                   ) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (codes and zero points re-centred)."""
    centre = 2 ** (module.bits - 1)
    group = format_group_size(module)
    repeat, groups = module.group_size // group, module.in_features // group
    codes = (module.codes(torch.int16) - centre).to(torch.int8)
    zeros = (module.zeros.to(torch.int16) - centre).to(torch.int8).repeat_interleave(repeat, dim=1)[:, :groups]
    scales = module.scale_values().repeat_interleave(repeat, dim=1)[:, :groups].contiguous()
    tensors = {f"{name}.weight_packed": pack_to_int32(codes, module.bits),
               f"{name}.weight_scale": scales,
               f"{name}.weight_zero_point": packed_zero_points(zeros, module.bits, pack_to_int32,
                                                               pad=runtime == "transformers"),
               f"{name}.weight_shape": torch.tensor([module.out_features, module.in_features])}
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().clone()
    return tensors


def packed_zero_points(zeros: torch.Tensor, bits: int, pack_to_int32, pad: bool = True) -> torch.Tensor:
    """Zero points packed along the outputs as compressed-tensors decompresses them; with ``pad``, in rows
    padded to the (outputs × groups) shape its transformers integration allocates for the parameter
    (0.20.1: allocated unpacked, read packed; the padding rows are never read). vLLM asserts the packed
    shape itself: ``pad=False``."""
    packed = pack_to_int32(zeros, bits, packed_dim=0)
    if not pad:
        return packed.contiguous()
    return torch.nn.functional.pad(packed, (0, 0, 0, zeros.shape[0] - packed.shape[0]))


def quantization_config(targets: dict[str, QuantizedLinear]) -> dict[str, Any]:
    """compressed-tensors' own config object, one group per (bits, group size)."""
    _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _require_compressed_tensors()
    groups: dict[tuple[int, int], list[str]] = {}
    for name, module in targets.items():
        groups.setdefault((module.bits, format_group_size(module)), []).append(name)
    schemes = {}
    for i, ((bits, group_size), names) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size)
        schemes[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=args, format=FORMAT)
    config = QuantizationConfig(config_groups=schemes, format=FORMAT, quantization_status="compressed")
    return config.model_dump(exclude_none=True)


def write_compressed_tensors(model: nn.Module, tokenizer: Any, directory: Path, runtime: str = "transformers"
                             ) -> int:
    """Write ``model`` (an lrcompress model of quantized linears) as a compressed-tensors checkpoint into
    the existing ``directory``, zero points shaped for ``runtime``; returns the number of quantized modules."""
    if runtime not in RUNTIMES:
        raise CheckpointError(f"runtime {runtime!r}: the compressed-tensors export is laid out for one of "
                              f"{', '.join(RUNTIMES)}")
    pack_to_int32, *_ = _require_compressed_tensors()
    targets = quantized_targets(model)
    config = quantization_config(targets)
    tensors, _ = unique_state_dict(model)
    tensors = {key: value for key, value in tensors.items()
               if not any(key.startswith(name + ".") for name in targets)}
    for name, module in targets.items():
        tensors.update(module_tensors(name, module, pack_to_int32, runtime))
    forget_compression(model)
    model_config = model.config.to_dict()
    model_config["quantization_config"] = config
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return len(targets)


def export_compressed_tensors(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False,
                              runtime: str = "transformers") -> int:
    """:func:`write_compressed_tensors` into a new directory ``out_dir`` (written aside, then renamed)."""
    with staged_directory(Path(out_dir), overwrite) as staging:
        return write_compressed_tensors(model, tokenizer, staging, runtime)
