"""Export rtn/gptq checkpoints in the compressed-tensors format (transformers loads it with the
``compressed-tensors`` package; vLLM serves it), in one of two schemes:

* ``wna16`` ("pack-quantized"): the checkpoint's own weight-only codes, exactly (below);
* ``w8a8`` ("int-quantized"): int8 weights with one symmetric scale per output channel, and dynamic
  symmetric per-token int8 activations — the scheme vLLM's ``CompressedTensorsW8A8Int8`` runs, and the
  one its CPU backend serves for widths other than 4 bits (its WNA16 kernel takes uint4 only,
  docs/vllm.md). lrcompress's codes are asymmetric and grouped, so the weights are *re-quantized*:
  s_i = max_j |Ŵ_ij| / 127, q_ij = round(Ŵ_ij / s_i) from the checkpoint's dequantized Ŵ (a second
  rounding, ≤ s_i/2 per weight), and the served model also rounds every quantized linear's input to
  int8 per token — it is not the checkpoint's weight-only model (bench/vllm.md measures the gap).

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

from ..core.packing import dequantize
from ..errors import CheckpointError
from ..modules import QuantizedLinear, compressed_modules
from ..modules.surgery import replace_submodule
from .export import forget_compression
from .layout import CONFIG_NAME, WEIGHTS_NAME, staged_directory
from .writer import unique_state_dict

FORMAT = "pack-quantized"
W8A8_FORMAT = "int-quantized"
RUNTIMES = ("transformers", "vllm")     # whose zero-point shape is written (module docstring)
SCHEMES = ("auto", "wna16", "w8a8")     # auto: wna16, except w8a8 for vllm where a width is not 4 bits
INT8_MAX = 127                          # symmetric int8 grid of the w8a8 scheme: [−127, 127]
FACTORED_KINDS = ("low_rank", "sparse_dict")   # may hold quantized factors (apply_to: factors): refused by name
EMBEDDING_KINDS = ("quantized_embedding", "quantized_tied_head")   # the recipe's embedding key: refused by name


def _require_compressed_tensors():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as error:
        raise CheckpointError("the compressed-tensors export needs the `compressed-tensors` package "
                              f"(pip install compressed-tensors): {error}") from None
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def quantized_targets(model: nn.Module, act_order: bool = False) -> dict[str, QuantizedLinear]:
    """The quantized linears of ``model``; refuses modules or options the format cannot hold (``act_order``:
    accept act-order checkpoints, which the w8a8 scheme re-quantizes in input order)."""
    found: dict[str, QuantizedLinear] = {}
    for name, module in compressed_modules(model):
        if module.kind in FACTORED_KINDS and any(isinstance(inner, QuantizedLinear) for inner in module.modules()):
            raise CheckpointError(f"module {name} is {module.kind} with quantized factors: compressed-tensors has no "
                                  "layout for a quantized factor pair or quantized dictionary values (it quantizes "
                                  "one weight per linear); export it with `lrcompress export --dense` instead")
        if module.kind in EMBEDDING_KINDS:
            raise CheckpointError(f"module {name} is a quantized token embedding ({module.kind}, the recipe's "
                                  "embedding key): lrcompress writes compressed-tensors for linear layers only, and "
                                  "runtimes read the token embedding of such a checkpoint as a float tensor; export "
                                  "with `lrcompress export --dense`, or compress without the embedding key")
        if not isinstance(module, QuantizedLinear):
            raise CheckpointError(f"module {name} is {module.kind}: the compressed-tensors export takes rtn/gptq "
                                  "quantized linears only (an EoRA run: export its base with --peft)")
        if module.act_order and not act_order:
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


def w8a8_weight(module: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's weight re-quantized to int8 codes (out × in, input order) and float32 scales (out × 1),
    symmetric per output channel: s_i = max_j |Ŵ_ij| / 127 (1 for an all-zero row), q = round(Ŵ / s)."""
    weight = dequantize(module.qweight, module.scale_values(), module.zeros, module.bits, module.group_size,
                        module.perm, module.in_features).to(torch.float64)     # exact, whatever the model dtype
    largest = weight.abs().amax(dim=1, keepdim=True)
    scale = torch.where(largest > 0, largest / INT8_MAX, torch.ones_like(largest)).to(torch.float32)
    codes = torch.round(weight / scale.to(torch.float64)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def w8a8_tensors(name: str, module: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The compressed-tensors "int-quantized" tensors of one quantized linear: ``weight`` (int8) and
    ``weight_scale`` (float32, out × 1), as its ``IntQuantizationCompressor`` writes a symmetric channel scheme."""
    codes, scale = w8a8_weight(module)
    tensors = {f"{name}.weight": codes, f"{name}.weight_scale": scale}
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().clone()
    return tensors


def quantize_per_token(x: torch.Tensor, levels: float = INT8_MAX) -> torch.Tensor:
    """``x`` rounded to int8 per token (last dimension) and scaled back, scale = max |x| / ``levels``: 127 is
    vLLM's dynamic per-token int8 quantization (CPU and CUDA), 127.5 compressed-tensors' own fake quantization."""
    largest = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(largest > 0, largest / levels, torch.ones_like(largest))
    return torch.round(x / scale).clamp(-INT8_MAX - 1, INT8_MAX) * scale


class W8A8Linear(nn.Linear):
    """The w8a8 scheme as served, in float: the re-quantized int8 weight times its scales, and (unless
    ``levels`` is None) every input rounded to int8 per token — lrcompress's reference for a w8a8 export."""

    def __init__(self, module: QuantizedLinear, levels: float | None = INT8_MAX) -> None:
        super().__init__(module.in_features, module.out_features, bias=module.bias is not None, dtype=module.dtype)
        codes, scale = w8a8_weight(module)
        with torch.no_grad():
            self.weight.copy_(codes.to(torch.float32) * scale)
            if module.bias is not None:
                self.bias.copy_(module.bias)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if self.levels is None else quantize_per_token(x, self.levels))


def simulate_w8a8(model: nn.Module, levels: float | None = INT8_MAX) -> nn.Module:
    """Replace every quantized linear of ``model`` by its :class:`W8A8Linear` (in place): what the w8a8 export
    computes, up to the served dtype; ``levels=None`` keeps the inputs in float (the weight re-quantization alone)."""
    for name, module in quantized_targets(model, act_order=True).items():
        replace_submodule(model, name, W8A8Linear(module, levels))
    return model


def resolve_scheme(scheme: str, runtime: str, targets: dict[str, QuantizedLinear]) -> str:
    """``auto``: ``w8a8`` for vLLM when a module is not 4-bit (its CPU WNA16 kernel serves uint4 only),
    else ``wna16`` (exact)."""
    if scheme not in SCHEMES:
        raise CheckpointError(f"scheme {scheme!r}: the compressed-tensors export writes one of {', '.join(SCHEMES)}")
    if scheme != "auto":
        return scheme
    return "w8a8" if runtime == "vllm" and any(m.bits != 4 for m in targets.values()) else "wna16"


def w8a8_config(targets: dict[str, QuantizedLinear]) -> dict[str, Any]:
    """compressed-tensors' config of the w8a8 scheme: int8 symmetric channel weights, dynamic symmetric
    per-token int8 inputs (what vLLM's ``CompressedTensorsW8A8Int8`` takes), format int-quantized."""
    _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _require_compressed_tensors()
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=sorted(targets), weights=weights, input_activations=inputs,
                                format=W8A8_FORMAT)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=W8A8_FORMAT,
                                quantization_status="compressed")
    return config.model_dump(exclude_none=True)


def quantization_config(targets: dict[str, QuantizedLinear]) -> dict[str, Any]:
    """compressed-tensors' own config object of the wna16 scheme, one group per (bits, group size)."""
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


def write_compressed_tensors(model: nn.Module, tokenizer: Any, directory: Path, runtime: str = "transformers",
                             scheme: str = "auto") -> tuple[int, str]:
    """Write ``model`` (an lrcompress model of quantized linears) as a compressed-tensors checkpoint into
    the existing ``directory`` in ``scheme`` (:data:`SCHEMES`; wna16 zero points shaped for ``runtime``);
    returns the number of quantized modules and the scheme written."""
    if runtime not in RUNTIMES:
        raise CheckpointError(f"runtime {runtime!r}: the compressed-tensors export is laid out for one of "
                              f"{', '.join(RUNTIMES)}")
    pack_to_int32, *_ = _require_compressed_tensors()
    scheme = resolve_scheme(scheme, runtime, quantized_targets(model, act_order=True))
    targets = quantized_targets(model, act_order=scheme == "w8a8")
    config = w8a8_config(targets) if scheme == "w8a8" else quantization_config(targets)
    tensors, _ = unique_state_dict(model)
    tensors = {key: value for key, value in tensors.items()
               if not any(key.startswith(name + ".") for name in targets)}
    for name, module in targets.items():
        tensors.update(w8a8_tensors(name, module) if scheme == "w8a8"
                       else module_tensors(name, module, pack_to_int32, runtime))
    forget_compression(model)
    model_config = model.config.to_dict()
    model_config["quantization_config"] = config
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return len(targets), scheme


def export_compressed_tensors(model: nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool = False,
                              runtime: str = "transformers", scheme: str = "auto") -> tuple[int, str]:
    """:func:`write_compressed_tensors` into a new directory ``out_dir`` (written aside, then renamed)."""
    with staged_directory(Path(out_dir), overwrite) as staging:
        return write_compressed_tensors(model, tokenizer, staging, runtime, scheme)
