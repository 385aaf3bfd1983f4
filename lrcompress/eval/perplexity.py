"""Token-level perplexity (DESIGN §6): non-overlapping windows, mean next-token NLL, exp."""
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

    def to_dict(self) -> dict:
        return asdict(self)


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


def perplexity(model: nn.Module, tokenizer, dataset: str, split: str, seq_len: int, max_windows: int | None,
               data_directory, batch_size: int = 4, device: torch.device | str = "cpu",
               nll: WindowsNll = windows_nll) -> PerplexityResult:
    """``nll``: how the summed NLL of the windows is computed (the whole model at once by default;
    ``eval.streamed`` runs one layer at a time for models that do not fit in memory)."""
    started = time.perf_counter()
    source = load_text(dataset, split, data_directory)
    windows = evaluation_windows(tokenize(tokenizer, source.text), seq_len, max_windows)
    total, count = nll(model, windows, batch_size, torch.device(device))
    protocol = (f"token-level perplexity, {dataset} {split}, {len(windows)} non-overlapping windows of "
                f"{seq_len} tokens from the start of the split, exp(mean next-token NLL)")
    return PerplexityResult(math.exp(total / count), dataset, split, seq_len, len(windows), count, protocol,
                            time.perf_counter() - started, source.description)
