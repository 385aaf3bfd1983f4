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
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import evaluation_windows, load_text, tokenize
from ..errors import NumericalError


@dataclass
class PerplexityResult:
    value: float
    dataset: str
    split: str
    seq_len: int
    windows: int
    tokens: int               # predicted tokens (windows × (seq_len − 1))
    protocol: str             # always printed with the number
    seconds: float
    source: str
    stderr: float | None = None       # of the perplexity (delta method), None with a single window
    log_stderr: float | None = None   # of log-perplexity: std of the windows' mean NLL / sqrt(windows)

    def to_dict(self) -> dict:
        return asdict(self)


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


def perplexity(model: nn.Module, tokenizer, dataset: str, split: str, seq_len: int, max_windows: int | None,
               data_directory, batch_size: int = 4, device: torch.device | str = "cpu",
               nll: WindowsNll = windows_nll, *, config: str | None = None,
               text_column: str = "text") -> PerplexityResult:
    """``nll``: how the summed NLL of the windows is computed (the whole model at once by default;
    ``eval.streamed`` runs one layer at a time for models that do not fit in memory)."""
    started = time.perf_counter()
    source = load_text(dataset, split, data_directory, config=config, text_column=text_column)
    windows = evaluation_windows(tokenize(tokenizer, source.text), seq_len, max_windows)
    sums = nll(model, windows, batch_size, torch.device(device))
    per_window = windows.shape[1] - 1
    count = per_window * len(sums)
    value = math.exp(sum(sums) / count)
    log_stderr = log_perplexity_stderr(sums, per_window)
    protocol = (f"token-level perplexity, {dataset} {split}, {len(windows)} non-overlapping windows of "
                f"{seq_len} tokens from the start of the split, exp(mean next-token NLL)")
    return PerplexityResult(value, dataset, split, seq_len, len(windows), count, protocol,
                            time.perf_counter() - started, source.description,
                            None if log_stderr is None else value * log_stderr, log_stderr)
