"""lrcompress: post-training compression of large language models."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, dtype=None, kernels=True):
    """Load a checkpoint written by lrcompress (or any dense HF directory, or a hub id) as a ready
    model. ``kernels=False`` keeps the exact dequantized reference forward of quantized modules
    instead of the packed CPU kernels (bfloat16 activations; see ``modules/cpu_kernels.py``)."""
    from pathlib import Path

    import torch

    from .checkpoint.reader import load_compressed
    from .models.loading import is_compressed_dir

    path = Path(path)
    if is_compressed_dir(path):
        return load_compressed(path, dtype=dtype, kernels=kernels)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()


from ._hf_registration import install as _install_hf_quantizer  # noqa: E402

_install_hf_quantizer()

__all__ = ["__version__", "load"]
