"""Token-level perplexity: non-overlapping windows, mean next-token NLL, exp; with its standard error.

Standard error: every window has the same number of predicted tokens, so log-perplexity L is the mean
of the windows' mean NLLs m_i, and its standard error is the standard error of that mean,
SE(L) = std(m_i, ddof=1) / sqrt(N) (the windows taken as a sample; consecutive windows of one text are
not independent, so this is the usual approximation, as lm-eval's stderr is). Perplexity is exp(L); by
the delta method SE(ppl) ≈ exp(L) · SE(L). Both are recorded (``log_stderr``, ``stderr``); the gate
compares perplexities on the log scale, where the noise is symmetric. With one window there is none.
"""
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
    stderr: float | None = None       # of the perplexity (delta method), None with a single window
    log_stderr: float | None = None   # of log-perplexity: std of the windows' mean NLL / sqrt(windows)

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None or key not in self.OPTIONAL}


def batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Summed next-token NLL (float64) of every window of one batch, given its logits."""
    logits = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    per_window = nll.double().view(targets.shape).sum(dim=1)
    if not torch.isfinite(per_window).all():
        raise NumericalError("perplexity: the model produced NaN/Inf logits")
    return per_window.tolist()


@torch.no_grad()
def windows_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> list[float]:
    """Summed next-token NLL (float64) of every window (each predicts seq_len − 1 tokens)."""
    home = next(model.parameters()).device
    model.to(device)
    sums: list[float] = []
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            sums += batch_nll(model(input_ids=batch, use_cache=False).logits, batch)
    finally:
        model.to(home)
    return sums


WindowsNll = Callable[[nn.Module, torch.Tensor, int, torch.device], list[float]]


def log_perplexity_stderr(window_sums: list[float], tokens_per_window: int) -> float | None:
    """SE of log-perplexity: the standard error of the mean of the windows' mean NLLs (module docstring)."""
    if len(window_sums) < 2:
        return None
    means = torch.tensor(window_sums, dtype=torch.float64) / tokens_per_window
    return float(means.std(unbiased=True) / math.sqrt(len(window_sums)))


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
    """Token-level perplexity of ``model`` on ``spec``'s dataset, split, window length and window count, with
    the standard error of log-perplexity over the windows (None with a single window)."""
    started = time.perf_counter()
    source = load_text(spec.dataset, spec.split, context.data_directory, config=getattr(spec, "config", None),
                       text_column=getattr(spec, "text_column", "text"))
    windows = evaluation_windows(tokenize(tokenizer, source.text), spec.seq_len, spec.max_windows, source.description)
    sums = context.nll(model, windows, context.batch_size, torch.device(context.device))
    per_window = windows.shape[1] - 1
    count = per_window * len(sums)
    value = math.exp(sum(sums) / count)
    log_stderr = log_perplexity_stderr(sums, per_window)
    protocol = (f"token-level perplexity, {spec.dataset} {spec.split}, {len(windows)} non-overlapping windows of "
                f"{spec.seq_len} tokens from the start of the split, exp(mean next-token NLL)")
    return PerplexityResult(value=value, dataset=spec.dataset, split=spec.split, seq_len=spec.seq_len,
                            windows=len(windows), tokens=count, protocol=protocol,
                            seconds=time.perf_counter() - started, source=source.description,
                            stderr=None if log_stderr is None else value * log_stderr, log_stderr=log_stderr)
