"""Token-level perplexity (DESIGN §6): non-overlapping windows, mean next-token NLL, exp."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

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


@torch.no_grad()
def windows_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens."""
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise NumericalError("perplexity: the model produced NaN/Inf logits")
        total += float(nll.double())
        count += targets.numel()
    return total, count


def perplexity(model: nn.Module, tokenizer, dataset: str, split: str, seq_len: int, max_windows: int | None,
               data_directory, batch_size: int = 4, device: torch.device | str = "cpu") -> PerplexityResult:
    started = time.perf_counter()
    source = load_text(dataset, split, data_directory)
    windows = evaluation_windows(tokenize(tokenizer, source.text), seq_len, max_windows)
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    try:
        total, count = windows_nll(model, windows, batch_size, device)
    finally:
        model.to(home)
    protocol = (f"token-level perplexity, {dataset} {split}, {len(windows)} non-overlapping windows of "
                f"{seq_len} tokens from the start of the split, exp(mean next-token NLL)")
    return PerplexityResult(math.exp(total / count), dataset, split, seq_len, len(windows), count, protocol,
                            time.perf_counter() - started, source.description)
