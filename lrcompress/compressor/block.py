"""Block-level compressors: they replace a whole block (e.g. an MoE layer's router + experts), not a Linear.

The pipeline asks the architecture adapter for the blocks of kind ``block_kind`` in each decoder
layer, hooks each block to feed the statistics in ``needs`` (the hook sees the block's input hidden
states and output), calls ``compress`` with the block and gets back a replacement block. A block
compressor may change the architecture config (the expert count): it says so in
``BlockResult.config_updates`` and the pipeline applies them to the model config, refusing conflicting
values from different blocks. Every block stage also gets ``block_input_sample``, a uniform sample of
the block's calibration inputs, on which the pipeline measures the replacement's relative output error.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from .base import CompressResult, Compressor, Plan
from .stats import STATISTICS, Statistic

INPUT_SAMPLE = "block_input_sample"
DEFAULT_SAMPLE_TOKENS = 2048


@dataclass
class BlockResult(CompressResult):
    """The replacement block, plus the config keys its shape implies (same for every block)."""

    config_updates: dict[str, Any] = field(default_factory=dict)


class BlockCompressor(Compressor):
    """A compressor whose targets are blocks located by the adapter (``block_kind``), not Linears."""

    block_kind: ClassVar[str]
    # True when the result changes the architecture config, so every block of the model must be a target
    # (a checkpoint has one config for all layers).
    uniform: ClassVar[bool] = True

    @abstractmethod
    def plan(self, module: nn.Module) -> Plan:
        """Parameters of the replacement block, without statistics."""

    @abstractmethod
    def compress(self, name: str, module: nn.Module, stats: Mapping[str, Statistic]) -> BlockResult:
        """The replacement block for ``module`` (named ``name``)."""


class InputSample(Statistic):
    """A uniform random sample (without replacement) of at most ``capacity`` input rows.

    Each row gets a random key; the sample is the ``capacity`` rows with the smallest keys, so two
    partial samples merge into the sample of the union. Seeded: the same inputs give the same sample.
    """

    name = INPUT_SAMPLE

    def __init__(self, capacity: int = DEFAULT_SAMPLE_TOKENS, seed: int = 0) -> None:
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: torch.Tensor | None = None
        self.keys = torch.empty(0)

    def observe(self, inputs: torch.Tensor, output: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).detach().to("cpu", torch.float32)
        keys = torch.rand(rows.shape[0], generator=self.generator)
        self._keep(rows, keys)

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, InputSample)
        if other.rows is not None:
            self._keep(other.rows, other.keys)

    def state(self) -> dict[str, torch.Tensor]:
        """Rows and their keys (none before the first batch); the generator stays with each process."""
        return {} if self.rows is None else {"rows": self.rows, "keys": self.keys}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.rows = state["rows"].clone() if "rows" in state else None
        self.keys = state["keys"].clone() if "keys" in state else torch.empty(0)

    def _keep(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        order = keys.argsort()[: self.capacity]
        self.rows, self.keys = rows[order], keys[order]

    def sample(self) -> torch.Tensor:
        if self.rows is None:
            raise ValueError("no input reached the block")
        return self.rows


STATISTICS[INPUT_SAMPLE] = lambda module, device, *_: InputSample()
