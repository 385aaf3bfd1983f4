"""lrcompress: post-training compression of large language models.

The Python API is ``run`` (a recipe: path, dict or ``Recipe``; optionally a model and calibration data
already in memory) and ``load`` (a checkpoint, compressed modules swapped in). See README "From Python".
"""

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


def run(recipe, model=None, dataset=None, **options):
    """Run a recipe (a YAML path, a dict or a ``Recipe``) and return its ``RunResult``.

    ``model``: a causal LM already in memory, compressed in place instead of ``model.path``; ``dataset``:
    calibration data in memory (text, records, a ``datasets.Dataset`` or token windows). Keyword options:
    ``tokenizer``, ``overrides`` (``--set`` strings), ``data_dir``, ``dry_run``, ``observer``. Full
    documentation: ``lrcompress.api.run``."""
    from .api import run as run_api

    return run_api(recipe, model, dataset, **options)


__all__ = ["__version__", "load", "run"]


def __dir__() -> list[str]:
    """Only the public API (submodules imported along the way stay reachable but are not listed)."""
    return list(__all__)
