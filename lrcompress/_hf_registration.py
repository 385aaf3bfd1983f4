"""Register the lrcompress quantizer with transformers when transformers' quantizer registry is imported.

``import lrcompress`` must make ``AutoModelForCausalLM.from_pretrained(checkpoint)`` work without
importing torch and transformers itself (the CLI starts in a tenth of a second). So the registration
runs right after ``transformers.quantizers.auto`` finishes importing (which ``from_pretrained`` always
does first), or at once if it already has.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    from .checkpoint.hf_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it lets the normal finders load ``REGISTRY`` and registers afterwards."""

    def find_spec(self, fullname: str, path, target=None):
        if fullname != REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
