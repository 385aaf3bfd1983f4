"""Token-level perplexity (DESIGN §6): non-overlapping windows, mean next-token NLL, exp."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_serializer
from torch import nn

from ..data import evaluation_windows, load_text, tokenize
from ..errors import NumericalError

if TYPE_CHECKING:
    from ..recipe import PerplexitySpec


class PerplexityResult(BaseModel):
    """One perplexity as metrics.json stores it. ``value`` and ``protocol`` are what a comparison needs;
    the rest is always written by lrcompress but optional when read, so that a hand-written baseline file
    for ``lrcompress check`` may give just those two."""

    model_config = ConfigDict(extra="forbid")
    OPTIONAL: ClassVar[tuple[str, ...]] = ("dataset", "split", "seq_len", "windows", "tokens", "seconds", "source")
    value: float
    dataset: str | None = None
    split: str | None = None
    seq_len: int | None = None
    windows: int | None = None
    tokens: int | None = None  # predicted tokens (windows × (seq_len − 1))
    protocol: str             # always printed with the number
    seconds: float | None = None
    source: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None or key not in self.OPTIONAL}


def batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) of one batch given its logits, and the predicted tokens."""
    logits = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    if not torch.isfinite(nll):
        raise NumericalError("perplexity: the model produced NaN/Inf logits")
    return float(nll.double()), targets.numel()


@torch.no_grad()
def windows_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens."""
    home = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            nll, tokens = batch_nll(model(input_ids=batch, use_cache=False).logits, batch)
            total += nll
            count += tokens
    finally:
        model.to(home)
    return total, count


WindowsNll = Callable[[nn.Module, torch.Tensor, int, torch.device], tuple[float, int]]


def silent(message: str) -> None:
    """The default ``announce``: say nothing."""


@dataclass(frozen=True)
class EvalContext:
    """Where and how a model is evaluated, the same for each of its evaluations: datasets resolve under
    ``data_directory``; windows go ``batch_size`` at a time to ``device``; ``nll`` computes their summed
    NLL (the whole model at once by default; ``eval.streamed`` runs one layer at a time for a model whose
    layers are not in memory); ``announce`` hears what starts."""

    data_directory: Path | str | None = None
    device: torch.device = torch.device("cpu")
    batch_size: int = 4
    announce: Callable[[str], None] = silent
    nll: WindowsNll = windows_nll

    def streaming(self, nll: WindowsNll) -> "EvalContext":
        return replace(self, nll=nll)


def perplexity(model: nn.Module, tokenizer, spec: "PerplexitySpec", context: EvalContext = EvalContext()
               ) -> PerplexityResult:
    """Token-level perplexity of ``model`` on ``spec``'s dataset, split, window length and window count."""
    started = time.perf_counter()
    source = load_text(spec.dataset, spec.split, context.data_directory)
    windows = evaluation_windows(tokenize(tokenizer, source.text), spec.seq_len, spec.max_windows)
    total, count = context.nll(model, windows, context.batch_size, torch.device(context.device))
    protocol = (f"token-level perplexity, {spec.dataset} {spec.split}, {len(windows)} non-overlapping windows of "
                f"{spec.seq_len} tokens from the start of the split, exp(mean next-token NLL)")
    return PerplexityResult(value=math.exp(total / count), dataset=spec.dataset, split=spec.split,
                            seq_len=spec.seq_len, windows=len(windows), tokens=count, protocol=protocol,
                            seconds=time.perf_counter() - started, source=source.description)
