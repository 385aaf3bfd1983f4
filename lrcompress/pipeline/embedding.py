"""The recipe's ``embedding`` key: the token embedding (and the LM head) quantized before the layer walk.

Done once, data-free, right after the dense baseline and before any pre-pass, so that everything after
it (the byte budget's prices and fixed bytes, the calibration statistics, the propagated inputs, the
evaluation) sees the model that will be written. A tied head (the same tensor as the embedding) becomes a
``TiedQuantizedHead`` on the embedding's very buffers; an untied one a ``QuantizedLinear`` on the same
grid (``untied_lm_head: false`` keeps it). Each replaced module gets a record (stage −1, layer −1)
whose error is the relative weight error ‖E − Ê‖/‖E‖: there is no calibration input to weigh it with. A tied
head's record counts no values and no bytes (they are the embedding's).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from ..compressor.embedding import quantize_embedding, quantize_head
from ..errors import LrcompressError
from ..models import ArchitectureAdapter
from ..modules import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, storage_bytes, untie
from ..modules.surgery import replace_submodule
from ..recipe import EmbeddingSpec
from .plan import PlannedModule
from .records import ModuleRecord

STAGE = -1       # the records and plan rows of the embedding: before every stage, outside the layers
METHOD = "rtn (embedding)"


def is_tied(model: nn.Module, adapter: ArchitectureAdapter) -> bool:
    """Whether the LM head multiplies by the embedding's very tensor (tie_word_embeddings, as loaded)."""
    if not adapter.lm_head:
        return False
    embed, head = model.get_submodule(adapter.embed), model.get_submodule(adapter.lm_head)
    return getattr(head, "weight", None) is getattr(embed, "weight", None)


def _replacements(model: nn.Module, adapter: ArchitectureAdapter, spec: EmbeddingSpec
                  ) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, module, its quantized replacement) for the embedding and, as ``spec`` says, the head."""
    embed = model.get_submodule(adapter.embed)
    if isinstance(embed, QuantizedEmbedding):
        raise LrcompressError(f"embedding: {adapter.embed} is quantized already")
    try:
        quantized = quantize_embedding(embed, spec.grid(), spec.symmetric)
    except ValueError as error:
        raise LrcompressError(f"embedding: {adapter.embed}: {error}") from None
    found = [(adapter.embed, embed, quantized)]
    if is_tied(model, adapter):
        found.append((adapter.lm_head, model.get_submodule(adapter.lm_head), TiedQuantizedHead.tie(quantized)))
    elif adapter.lm_head and spec.untied_lm_head:
        head = model.get_submodule(adapter.lm_head)
        if not isinstance(head, nn.Linear):
            raise LrcompressError(f"embedding.untied_lm_head: {adapter.lm_head} is a {type(head).__name__}, not a "
                                  "Linear; set embedding.untied_lm_head: false to keep it")
        found.append((adapter.lm_head, head, quantize_head(head, spec.grid(), spec.symmetric)))
    return found


def quantize_model_embedding(model: nn.Module, adapter: ArchitectureAdapter, spec: EmbeddingSpec
                             ) -> list[ModuleRecord]:
    """Swap the quantized embedding (and head) into ``model``; one record per stored matrix."""
    started = time.perf_counter()
    replaced = _replacements(model, adapter, spec)
    untie(model, [name for name, _, _ in replaced])
    tied = any(isinstance(replacement, TiedQuantizedHead) for _, _, replacement in replaced)
    records = []
    for name, module, replacement in replaced:      # the embedding first
        replace_submodule(model, name, replacement)
        if isinstance(replacement, TiedQuantizedHead):    # nothing of its own: the embedding's very codes
            records.append(replace(records[0], name=name, params_before=0, params_after=0, bytes_before=0,
                                   bytes_after=0, details={"tied_to": adapter.embed},
                                   numerical_path=f"tied: multiplies by the codes of {adapter.embed}"))
        else:
            records.append(_record(name, module, replacement, tied, time.perf_counter() - started))
    return records


def _record(name: str, module: nn.Module, replacement: nn.Module, tied: bool, seconds: float) -> ModuleRecord:
    weight = module.weight.detach().to(torch.float64)
    error = float(torch.linalg.norm(weight - replacement.dense_weight().to(torch.float64))
                  / torch.linalg.norm(weight).clamp_min(1e-30))
    rows, columns = weight.shape
    details = {"bits": replacement.bits, "group_size": replacement.group_size, "error": "weight"}
    if isinstance(replacement, QuantizedEmbedding):
        details.update(symmetric=replacement.symmetric, embed_scale=replacement.embed_scale, tied_lm_head=tied)
    return ModuleRecord(name=name, layer=STAGE, stage=STAGE, method=METHOD, in_features=columns, out_features=rows,
                        params_before=weight.numel(), params_after=replacement.stored_params(), rank=None,
                        relative_error=error, numerical_path="round-to-nearest (data-free; weight error)",
                        seconds=seconds, details=details, bytes_before=storage_bytes(module),
                        bytes_after=storage_bytes(replacement))


def planned_embedding(model: nn.Module, adapter: ArchitectureAdapter, spec: EmbeddingSpec | None
                      ) -> list[PlannedModule]:
    """The plan rows of the embedding (and an untied head), exact bytes from modules built on the meta
    device: what ``--dry-run`` shows beside the stages' plan."""
    if spec is None:
        return []
    embed = model.get_submodule(adapter.embed)
    rows, columns = embed.weight.shape
    width = spec.grid().width(columns)
    skeleton = QuantizedEmbedding(rows, columns, spec.bits, width, spec.scale_dtype, dtype=embed.weight.dtype,
                                  device="meta")
    planned = [PlannedModule(adapter.embed, STAGE, METHOD + (", tied lm_head" if is_tied(model, adapter) else ""),
                             rows, columns, rows * columns, rows * columns, None, bytes_before=storage_bytes(embed),
                             bytes_after=storage_bytes(skeleton))]
    if adapter.lm_head and not is_tied(model, adapter) and spec.untied_lm_head:
        head = model.get_submodule(adapter.lm_head)
        out_features, in_features = head.weight.shape
        head_skeleton = QuantizedLinear(in_features, out_features, spec.bits, spec.grid().width(in_features),
                                        spec.scale_dtype, bias=head.bias is not None, dtype=head.weight.dtype,
                                        device="meta")
        planned.append(PlannedModule(adapter.lm_head, STAGE, METHOD, out_features, in_features, head.weight.numel(),
                                     head.weight.numel(), None, bytes_before=storage_bytes(head),
                                     bytes_after=storage_bytes(head_skeleton)))
    return planned
