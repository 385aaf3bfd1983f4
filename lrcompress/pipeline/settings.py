"""What the engine and every pre-pass are configured with: the stages and the run settings.

Kept apart from the engine so that the pre-passes and the out-of-memory helper can name these types
without importing the engine (which imports them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torch import nn

from ..compressor import Compressor
from ..core.devices import resolve_device
from ..compressor.block import BlockCompressor
from .blocks import BlockTargets
from .distributed import Collective
from .targets import LinearTargets, TargetKind

if TYPE_CHECKING:
    from ..recipe import RefineSpec, RuntimeSpec


@dataclass
class Stage:
    """A compressor bound to its target patterns (one entry of the recipe's ``stages``)."""

    index: int
    compressor: Compressor
    targets: list[str]
    ignore: list[str] = field(default_factory=list)
    # The recipe's AllocationSpec (strategy, floor, ceiling); None or "uniform": the method's own size.
    allocation: Any = None

    @property
    def kind(self) -> TargetKind:
        """Linears, or whole blocks (e.g. MoE) for a ``BlockCompressor``: the one place that tells them apart."""
        return BlockTargets() if isinstance(self.compressor, BlockCompressor) else LinearTargets()

    def select(self, layer: nn.Module, prefix: str) -> list[str]:
        """Names (relative to ``layer``, whose full name is ``prefix``) of the modules this stage compresses."""
        return self.kind.select(layer, prefix, self)

    def shape(self, module: nn.Module, config) -> tuple[int, int]:
        """(out, in) features of a target: a Linear's own, hidden × hidden for a block."""
        return self.kind.shape(module, config)

    @property
    def needs(self) -> frozenset[str]:
        """The compressor's statistics, plus what measures the output error: the Gram (Linears) or a
        sample of the block's inputs (blocks)."""
        return self.kind.needs(self.compressor)

    @property
    def group_size(self) -> int:
        return self.compressor.group_size


@dataclass
class PipelineSettings:
    batch_size: int = 4
    compute: torch.device = torch.device("cpu")
    offload: torch.device = torch.device("cpu")
    sequential: bool = True
    # The processes this run is spread over (one by default). A field of the settings so that the
    # engine and every pre-pass reach it the same way.
    collective: Collective = field(default_factory=Collective)
    num_samples: int | None = None        # calibration windows over all processes, for memory hints
    # What each module is fitted to: "layer" (its own weight's outputs on the inputs it receives, the
    # classic layer-wise objective) or "original" (the uncompressed model's outputs; pipeline.reference).
    target: str = "layer"
    target_damping: float = 1e-2          # λ of the ridge toward W in the output-matching target W*
    target_blend: float = 1.0             # α: the fraction of the correction W* − W applied (T = W + α(W* − W))
    # One statistics pass per set of targets sharing an input within a layer (pipeline.passes); None:
    # on exactly when target is "original" (where fitting stale inputs hurts most).
    true_sequential: bool | None = None
    # runtime.refine: each compressed layer refined toward the uncompressed model's outputs (pipeline.refine);
    # None: off. ``seed`` (the recipe's) seeds each layer's batch shuffle (seed + layer index).
    refine: "RefineSpec | None" = None
    seed: int = 0

    @property
    def passes_within_layer(self) -> bool:
        return self.true_sequential if self.true_sequential is not None else self.target == "original"

    @classmethod
    def from_runtime(cls, runtime: "RuntimeSpec", collective: Collective, num_samples: int,
                     seed: int = 0) -> "PipelineSettings":
        """The recipe's ``runtime`` section, with the devices placed for this process; ``seed``: the recipe's."""
        return cls(runtime.batch_size, collective.place(resolve_device(runtime.device)),
                   collective.place(torch.device(runtime.offload_device)), runtime.sequential, collective,
                   num_samples, target=runtime.target, target_damping=runtime.target_damping,
                   target_blend=runtime.target_blend, true_sequential=runtime.true_sequential,
                   refine=runtime.refine, seed=seed)
