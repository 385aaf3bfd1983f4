"""Where a run's decoder layers live: all in host memory (the default) or read from the safetensors
shards one segment of layers at a time (``runtime.lazy``).

The choice is made once, by ``open_model``; the runner then asks the object for the three things that
differ between the two: how the model is loaded, the layer store the pipeline takes the original
weights from, and how a perplexity runs (the whole model at once, or streamed layer by layer).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoint import read_metadata
from .errors import LrcompressError
from .eval.perplexity import WindowsNll, windows_nll
from .eval.streamed import StreamedNll
from .models import ArchitectureAdapter, LoadedModel, adapter_for, load_model
from .models.lazy import LayerStore, LazyLayers, ResidentLayers, load_lazy
from .pipeline.allocation import strategy_of
from .pipeline.prepass import is_prepass_kind
from .pipeline.settings import Stage
from .recipe import ModelSpec, Recipe


class ResidentModel:
    """The whole model in memory: the layer store has nothing to do, perplexity runs the model."""

    lazy = False
    loading_note = ""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: nn.Module = loaded.model
        self.tokenizer = loaded.tokenizer
        self.adapter: ArchitectureAdapter = adapter_for(loaded.model)

    @classmethod
    def load(cls, spec: ModelSpec) -> "ResidentModel":
        return cls(load_model(spec.path, spec.dtype, spec.trust_remote_code))

    def layers(self) -> LayerStore:
        return ResidentLayers()

    def dense_nll(self) -> WindowsNll:
        return windows_nll

    def compressed_nll(self, checkpoint: Path) -> WindowsNll:
        return windows_nll


class LazyModel(ResidentModel):
    """A meta-device skeleton: each decoder layer is read from the shards while it is worked on, and
    perplexity streams the layers (of the source for the dense baseline, of the written checkpoint after)."""

    lazy = True
    loading_note = " (lazy: tensors outside the decoder layers only)"

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self.store = LazyLayers(self.model, self.adapter, loaded.local_dir)

    @classmethod
    def load(cls, spec: ModelSpec) -> "LazyModel":
        return cls(load_lazy(spec.path, spec.dtype, spec.trust_remote_code))

    @staticmethod
    def refuse_unsupported(recipe: Recipe, stages: list[Stage]) -> None:
        """What lazy mode cannot do, refused before any work: it writes layers as they finish (so it needs
        an output directory) and never holds the whole model (no lm-eval tasks, no whole-model pre-pass)."""
        if not recipe.output.save:
            raise LrcompressError("runtime.lazy writes each segment of layers as it finishes: it needs output.save: true")
        if recipe.eval.lm_eval is not None:
            raise LrcompressError("runtime.lazy: lm-eval tasks need the whole model in memory; remove eval.lm_eval "
                                  "(perplexity is streamed layer by layer) or evaluate the checkpoint afterwards "
                                  "with `lrcompress eval` on a machine that holds it")
        for stage in stages:
            kinds = sorted(kind for kind in stage.needs if is_prepass_kind(kind))
            if strategy_of(stage) in ("global", "bytes"):
                kinds.append(f"output_gradient (allocation: {strategy_of(stage)})")
            if kinds:
                raise LrcompressError(f"runtime.lazy: stage {stage.index} ({stage.compressor.name}) needs {kinds}, "
                                      "a pass over the whole model; use runtime.lazy: false")

    def layers(self) -> LayerStore:
        return self.store

    def dense_nll(self) -> WindowsNll:
        return StreamedNll(self.store, self.adapter)

    def compressed_nll(self, checkpoint: Path) -> WindowsNll:
        """The written checkpoint, one layer at a time (its layers are not in memory)."""
        _, meta = read_metadata(checkpoint)
        return StreamedNll(LazyLayers(self.model, self.adapter, checkpoint, meta.get("tied", {})), self.adapter)


def model_class(recipe: Recipe, stages: list[Stage]) -> type[ResidentModel]:
    """The recipe's choice (``runtime.lazy``), checked against what the stages need before any loading."""
    if not recipe.runtime.lazy:
        return ResidentModel
    LazyModel.refuse_unsupported(recipe, stages)
    return LazyModel
