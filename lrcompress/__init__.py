"""lrcompress: post-training compression of large language models.

The Python API is ``run`` (a recipe: path, dict or ``Recipe``; optionally a model and calibration data
already in memory) and ``load`` (a checkpoint, compressed modules swapped in). See README "From Python".
"""

from .core.version import __version__


def load(path, dtype=None, kernels=True):
    """Load a checkpoint written by lrcompress (or any dense HF directory, or a hub id) as a ready
    model. ``kernels=False`` keeps the exact dequantized reference forward of quantized modules
    instead of the packed CPU kernels (bfloat16 activations; see ``modules/cpu_kernels.py``)."""
    from .models.loading import load_ready

    return load_ready(path, dtype=dtype, kernels=kernels)


def run(recipe, model=None, dataset=None, **options):
    """Run a recipe (a YAML path, a dict or a ``Recipe``) and return its ``RunResult``.

    ``model``: a causal LM already in memory, compressed in place instead of ``model.path``; ``dataset``:
    calibration data in memory (text, records, a ``datasets.Dataset`` or token windows). Keyword options:
    ``tokenizer``, ``overrides`` (``--set`` strings), ``data_dir``, ``dry_run``, ``observer``. Full
    documentation: ``lrcompress.api.run``."""
    from .api import run as run_api

    return run_api(recipe, model, dataset, **options)


from ._hf_registration import install as _install_hf_quantizer  # noqa: E402

_install_hf_quantizer()

__all__ = ["__version__", "load", "run"]


def __dir__() -> list[str]:
    """Only the public API (submodules imported along the way stay reachable but are not listed)."""
    return list(__all__)
