"""Text -> token windows: seeded random calibration windows, consecutive evaluation windows."""
from __future__ import annotations

import hashlib

import torch

from ..errors import LrcompressError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor (no special tokens: windows are cut from running text)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than model max length"
    try:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return ids


def calibration_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int,
                        source: str = "the calibration text") -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens starting at seeded uniform random offsets; ``source``
    names the text in the message when it is too short."""
    if ids.numel() <= seq_len:
        raise LrcompressError(f"calibration data {source} has {ids.numel()} tokens; {num_samples} windows of "
                              f"calibration.seq_len {seq_len} need at least {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None,
                       source: str = "the evaluation text") -> torch.Tensor:
    """Non-overlapping consecutive windows from the start of the split; the tail is dropped."""
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise LrcompressError(f"evaluation data {source} has {ids.numel()} tokens, not one window of seq_len "
                              f"{seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def windows_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
