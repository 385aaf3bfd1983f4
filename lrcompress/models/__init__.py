"""Model loading and architecture adapters."""
from .adapters import ADAPTERS, ArchitectureAdapter, adapter_for, register_adapter
from .loading import DTYPES, LoadedModel, load_model, resolve_model_dir

__all__ = ["ADAPTERS", "ArchitectureAdapter", "DTYPES", "LoadedModel", "adapter_for", "load_model",
           "register_adapter", "resolve_model_dir"]
