"""nn.Modules that compressed weights become."""
from .base import (MODULE_KINDS, CompressedLinear, CompressedModule, compressed_modules, dense_weight,
                   module_from_spec, module_spec, prepare_for_inference, register_module_kind, spec_shape, storage_bytes, stored_params,
                   to_dense_linear)
from .compensated import CompensatedLinear
from .embedding import QuantizedEmbedding, ScaledEmbedding, TiedQuantizedHead, retie, untie
from .experts import FusedExperts, LowRankExperts
from .low_rank import LowRankLinear
from .quantized import QuantizedLinear
from .sparse import MaskedSparseLinear, NMSparseLinear
from .sparse_dict import SparseDictLinear

__all__ = ["MODULE_KINDS", "CompensatedLinear", "CompressedLinear", "CompressedModule", "FusedExperts",
           "LowRankExperts", "LowRankLinear", "MaskedSparseLinear", "NMSparseLinear", "QuantizedEmbedding", "QuantizedLinear",
           "ScaledEmbedding", "TiedQuantizedHead",
           "SparseDictLinear", "compressed_modules", "dense_weight", "module_from_spec", "module_spec",
           "prepare_for_inference", "register_module_kind", "retie", "spec_shape", "storage_bytes", "stored_params", "to_dense_linear", "untie"]
