"""lrcompress: post-training compression of large language models."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, dtype=None):
    """Load a checkpoint written by lrcompress (or any dense HF directory) as a ready model."""
    from pathlib import Path

    import torch

    from .checkpoint.reader import load_compressed
    from .models.loading import is_compressed_dir

    path = Path(path)
    if is_compressed_dir(path):
        return load_compressed(path, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()


__all__ = ["__version__", "load"]
