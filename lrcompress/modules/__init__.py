"""nn.Modules that compressed weights become."""
from .base import (MODULE_KINDS, CompressedLinear, dense_weight, register_module_kind,
                   stored_params, to_dense_linear)
from .low_rank import LowRankLinear

__all__ = ["MODULE_KINDS", "CompressedLinear", "LowRankLinear", "dense_weight", "register_module_kind",
           "stored_params", "to_dense_linear"]
