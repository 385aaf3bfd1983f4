"""A transformers quantizer for lrcompress checkpoints: ``AutoModelForCausalLM.from_pretrained`` loads them.

A checkpoint's config.json carries ``quantization_config = {"quant_method": "lrcompress", "modules":
{name: spec}, "tied": {alias: stored name}, ...}``. transformers builds the architecture (on the meta
device), this quantizer swaps in the compressed module of every spec before the weights are read, and
transformers' own loader then fills them from the safetensors files it resolved itself (``cached_file``:
a local directory or a hub id). Tensors stored once for several names (a shared CoSpaDi dictionary) are
re-pointed after loading, as ``lrcompress.load`` does, and the compressed modules then build their
inference layouts (``prepare_inference``).

Without lrcompress, transformers would skip the unknown quantization method and fill every
compressed module with random weights; the ``transformers_weights`` guard the writer puts in config.json
(``layout.LOAD_GUARD``) makes it refuse with a sentence naming the method instead, and
:meth:`LrcompressQuantizer.update_attn_implementation` (the one hook that sees the config before the
files are resolved) removes the guard when lrcompress is there.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from ..modules import MODULE_KINDS, prepare_for_inference, untie
from ..modules.surgery import replace_submodule
from .layout import FORMAT_VERSION, GUARD_KEY, LOAD_GUARD, QUANT_METHOD
from .reader import restore_aliases


class LrcompressConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of an lrcompress checkpoint (what the loader needs)."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, tied: dict[str, str] | None = None,
                 format_version: int = FORMAT_VERSION, dtype: str = "float32",
                 provenance: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.dtype = dtype
        self.modules = modules or {}
        self.tied = tied or {}
        self.provenance = provenance or {}
        if format_version != FORMAT_VERSION:
            raise CheckpointError(f"lrcompress checkpoint format version {format_version} is not supported "
                                  f"(this lrcompress reads version {FORMAT_VERSION})")


class LrcompressQuantizer(HfQuantizer):
    """Rebuilds the compressed modules of a checkpoint written by lrcompress (it never quantizes)."""

    requires_calibration = True     # the weights must already be compressed: no on-the-fly path

    def update_attn_implementation(self, config):
        if getattr(config, GUARD_KEY, None) == LOAD_GUARD:
            delattr(config, GUARD_KEY)
        return config

    def _process_model_before_weight_loading(self, model, dtype: torch.dtype | None = None, **kwargs: Any):
        dtype = dtype or getattr(torch, self.quantization_config.dtype)
        for name, spec in self.quantization_config.modules.items():
            kind = MODULE_KINDS.get(spec.get("kind"))
            if kind is None:
                raise CheckpointError(f"module {name}: unknown compressed kind {spec.get('kind')!r}; "
                                      f"known: {sorted(MODULE_KINDS)}")
            replace_submodule(model, name, kind.from_spec(spec, dtype))
        untie(model, list(self.quantization_config.modules))   # a quantized embedding and head: tied by aliases
        aliases = [re.escape(alias) + "$" for alias in self.quantization_config.tied]
        if aliases:      # stored once under another name: not missing (re-pointed after loading)
            model._keys_to_ignore_on_load_missing = [*(model._keys_to_ignore_on_load_missing or []), *aliases]
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        restore_aliases(model, self.quantization_config.tied)
        for module in model.modules():    # transformers assigns tensors without load_state_dict's hooks
            unpack = getattr(module, "unpack_indices", None)
            if callable(unpack):
                unpack()
        return prepare_for_inference(model)

    def is_serializable(self, **kwargs: Any) -> bool:
        # model.save_pretrained would drop the guard: lrcompress's writer is the way to save these.
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers know quant_method "lrcompress" (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(LrcompressConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(LrcompressQuantizer)
