"""A recipe's calibration section -> its token windows, one source at a time.

Each source of a mixture is read, tokenized and windowed on its own: its windows come from its own text
alone, drawn with ``source_seed(seed, index)`` so that adding, removing or resizing one source leaves the
others' windows as they were. The windows are concatenated in the order of ``calibration.sources``. The
one-source form is a mixture of one source with ``seed`` itself: the same windows as before mixtures.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LrcompressError
from .sources import TextSource, load_text
from .windows import calibration_windows, tokenize, windows_fingerprint

_GOLDEN = 0x9E3779B97F4A7C15      # 2⁶⁴/φ: consecutive indices land far apart in seed space


def source_seed(seed: int, index: int) -> int:
    """The window seed of source ``index``: ``seed`` for the first, a fixed spread for the others."""
    return seed if index == 0 else (seed + index * _GOLDEN) % 2**64


@dataclass
class SourceWindows:
    """One source's share of the calibration set, for metrics.json and the report."""

    description: str
    text_sha256: str
    tokens: int                  # tokens of the source's whole text (what the windows were drawn from)
    num_samples: int
    windows_sha256: str

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CalibrationSet:
    """A run's calibration windows and where they came from."""

    source: TextSource           # the one source, or a summary of the mixture (its text is not kept)
    windows: torch.Tensor        # num_samples × seq_len, the sources' windows in order
    parts: list[SourceWindows] | None = None     # per source (None: handed over in memory by a library caller)


def calibration_set(spec: Any, tokenizer: Any, directory: Path | None) -> CalibrationSet:
    """The windows of a ``CalibrationSpec``: every source read, tokenized and windowed on its own."""
    texts, windows, parts = [], [], []
    for index, part in enumerate(spec.parts()):
        where = f"calibration.sources.{index}" if spec.is_mixture else "calibration"
        try:
            text = load_text(part.dataset, part.split, directory, config=part.config, text_column=part.text_column,
                             chat_tokenizer=tokenizer if part.chat_template else None)
            ids = tokenize(tokenizer, text.text)
            drawn = calibration_windows(ids, part.num_samples, spec.seq_len, source_seed(spec.seed, index),
                                        text.description)
        except LrcompressError as error:
            raise (LrcompressError(f"{where}: {error}") if spec.is_mixture else error) from None
        texts.append(text)
        windows.append(drawn)
        parts.append(SourceWindows(text.description, text.fingerprint, ids.numel(), part.num_samples,
                                   windows_fingerprint(drawn)))
    if not spec.is_mixture:
        return CalibrationSet(texts[0], windows[0], parts)
    summary = TextSource("", "mixture: " + " + ".join(f"{p.num_samples} × {p.description}" for p in parts),
                         _combined(t.fingerprint for t in texts))
    return CalibrationSet(summary, torch.cat(windows), parts)


def _combined(fingerprints) -> str:
    return hashlib.sha256(",".join(fingerprints).encode()).hexdigest()[:16]
