"""What the engine and every pre-pass are configured with: the stages and the run settings.

Kept apart from the engine so that the pre-passes and the out-of-memory helper can name these types
without importing the engine (which imports them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..compressor import Compressor
from .blocks import block_needs, is_block_stage
from .distributed import Collective


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
    def needs(self) -> frozenset[str]:
        if is_block_stage(self):  # block stages: their own statistics + a sample for the block error
            return block_needs(self.compressor)
        # The Gram is always collected: it gives every module's relative output error.
        return self.compressor.needs | {"gram"}

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

    @property
    def passes_within_layer(self) -> bool:
        return self.true_sequential if self.true_sequential is not None else self.target == "original"
