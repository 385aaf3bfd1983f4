"""SparseDictLinear: y = (x·D)·S + b, a dense dictionary times a column-sparse coefficient matrix.

S (k × out) has exactly s nonzeros per column, stored in a fixed-nnz layout: ``values`` [s, out] in
the model dtype and the indices [s, out], so every output column costs the same and the forward is a
gather (``triton_kernels.sparse_dict_matmul``).

Indices are stored bit-packed at ⌈log₂ k⌉ bits each (``packed_indices``, uint8, the bit-stream layout
of ``packing``): that is what the checkpoint holds and what the budget charges. The forward wants
them as integers: ``indices`` (int16 when k < 32768, else int32, [s, out]) is a non-persistent
buffer unpacked once, when the module is built or loaded, never per call. Checkpoints written before
the packed layout (spec without ``index_bits``, an int16/int32 ``indices`` tensor) still load: the
tensor is packed on the way in.

Inference on CPU: :meth:`SparseDictLinear.prepare_inference` (run by ``lrcompress.load`` and
``from_pretrained``) builds the coefficient matrix S once as a dense k × out matrix, and the forward is
two GEMMs, (x·D)·S. At batch 1 on CPU that is the fastest layout torch offers here: a per-call scatter,
a CSR S (int32 indices, MKL) and the gather form are all slower (bench/RESULTS.md). Its price is memory: k·out
values instead of s·out values and indices (2× the values at k = 2s), so the module in memory is about
the size of the dense weight (in·k + k·out against in·out; the checkpoint keeps the compressed size).
On CUDA the Triton gather kernel runs on the fixed-nnz layout and nothing is built.

A dictionary may be shared by several modules (CoSpaDi's per-group mode): they hold the same
Parameter, the checkpoint stores it once (an alias in the "tied" list), and each module's
``stored_params`` is charged its share of the dictionary so that the shares add up exactly.

Quantized factors (an ``rtn``/``gptq`` stage with ``apply_to: factors``, docs/quantized-factors.md): the
s × out values may be stored as a ``QuantizedLinear`` of s inputs and ``out`` outputs, ``quantized_values``
(its weight is Sᵀ's nonzeros, one row per output column, groups along the column's support), and a
dictionary of this module alone as a ``QuantizedLinear`` of ``in`` inputs and k outputs,
``quantized_dictionary`` (its weight is Dᵀ; z = x·D is its forward). The ``values``/``dictionary``
parameters are then absent (None): :meth:`SparseDictLinear.value_matrix` and
:meth:`SparseDictLinear.dictionary_matrix` dequantize when needed, and the spec nests the quantized modules'
specs under ``values``/``dictionary``. A shared dictionary is never quantized (its members would each round
it differently).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import triton_kernels
from .base import CompressedLinear, module_from_spec, module_spec, register_module_kind, storage_bytes
from .quantized import QuantizedLinear
from ..core.packing import pack_codes, packed_bytes, unpack_codes

INT16_ATOMS = 32768


def index_dtype_for(atoms: int) -> torch.dtype:
    return torch.int16 if atoms < INT16_ATOMS else torch.int32


def index_bits(atoms: int) -> int:
    """Bits of one stored index into ``atoms`` atoms: ⌈log₂ k⌉, at least 1."""
    return max(1, (atoms - 1).bit_length())


def index_cost(atoms: int, value_dtype: torch.dtype) -> float:
    """Size of one stored index in units of one stored value (9-bit index, bfloat16 value: 0.5625)."""
    return index_bits(atoms) / (8 * value_dtype.itemsize)


def index_bytes(count: int, atoms: int) -> int:
    """Bytes of ``count`` stored indices into a dictionary of ``atoms`` atoms (packed)."""
    return packed_bytes(count, index_bits(atoms))


def index_params(count: int, atoms: int, value_dtype: torch.dtype) -> int:
    """Stored indices in units of stored values: index bytes / bytes per value, rounded up."""
    return math.ceil(index_bytes(count, atoms) / value_dtype.itemsize)


def sparse_dict_params(in_features: int, out_features: int, atoms: int, sparsity: int, value_dtype: torch.dtype,
                       bias: bool, dictionary_share: int | None = None) -> int:
    """What ``SparseDictLinear.stored_params`` reports, from the shapes alone (a compressor's plan)."""
    share = in_features * atoms if dictionary_share is None else dictionary_share
    values = sparsity * out_features
    return share + values + index_params(values, atoms, value_dtype) + (out_features if bias else 0)


def dictionary_shares(in_features: int, atoms: int, members: int) -> list[int]:
    """Split the d_in·k dictionary values among ``members`` modules; the shares sum exactly."""
    total = in_features * atoms
    base, extra = divmod(total, members)
    return [base + (1 if i < extra else 0) for i in range(members)]


@register_module_kind
class SparseDictLinear(CompressedLinear):
    kind = "sparse_dict"

    def __init__(self, in_features: int, out_features: int, atoms: int, sparsity: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 dictionary: nn.Parameter | None = None, dictionary_share: int | None = None,
                 quantized_values: QuantizedLinear | None = None,
                 quantized_dictionary: QuantizedLinear | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.atoms, self.sparsity = atoms, sparsity
        self.dictionary_share = in_features * atoms if dictionary_share is None else dictionary_share
        self.dtype = dtype or torch.get_default_dtype()
        if quantized_dictionary is not None:
            if (quantized_dictionary.in_features, quantized_dictionary.out_features) != (in_features, atoms):
                raise ValueError(f"quantized dictionary of {quantized_dictionary.in_features} inputs and "
                                 f"{quantized_dictionary.out_features} atoms != ({in_features}, {atoms})")
            if self.dictionary_share != in_features * atoms:
                raise ValueError("a shared dictionary cannot be quantized")
            self.register_parameter("dictionary", None)
            self.quantized_dictionary = quantized_dictionary
        else:
            if dictionary is None:
                dictionary = nn.Parameter(torch.empty(in_features, atoms, dtype=dtype, device=device))
            if tuple(dictionary.shape) != (in_features, atoms):
                raise ValueError(f"dictionary shape {tuple(dictionary.shape)} != ({in_features}, {atoms})")
            self.dictionary = dictionary
        if quantized_values is None:
            self.values = nn.Parameter(torch.empty(sparsity, out_features, dtype=dtype, device=device))
        else:
            if (quantized_values.in_features, quantized_values.out_features) != (sparsity, out_features):
                raise ValueError(f"quantized values of {quantized_values.out_features}×{quantized_values.in_features} "
                                 f"do not hold {out_features} columns of {sparsity} nonzeros")
            self.register_parameter("values", None)
            self.quantized_values = quantized_values
        self.register_buffer("packed_indices", torch.zeros(index_bytes(sparsity * out_features, atoms),
                                                           dtype=torch.uint8, device=device))
        self.register_buffer("indices", torch.zeros(sparsity, out_features, dtype=index_dtype_for(atoms),
                                                    device=device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._coefficients: torch.Tensor | None = None     # dense S, built by prepare_inference (CPU)

    @classmethod
    def from_code(cls, dictionary: nn.Parameter | torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  bias: torch.Tensor | None, dtype: torch.dtype, dictionary_share: int | None = None
                  ) -> "SparseDictLinear":
        """Build from D [in, k] (a Parameter to share it), indices/values [s, out]; cast to ``dtype``."""
        in_features, atoms = dictionary.shape
        sparsity, out_features = values.shape
        if not isinstance(dictionary, nn.Parameter):
            dictionary = nn.Parameter(dictionary.detach().to(dtype))
        module = cls(in_features, out_features, atoms, sparsity, bias=bias is not None, dtype=dtype,
                     device=values.device, dictionary=dictionary, dictionary_share=dictionary_share)
        if indices.min() < 0 or indices.max() >= atoms:
            raise ValueError("indices out of range of the dictionary")
        with torch.no_grad():
            module.values.copy_(values.to(dtype))
            module.packed_indices.copy_(pack_codes(indices, index_bits(atoms)))
            module.indices.copy_(indices.to(module.indices.dtype))
            if bias is not None:
                module.bias.copy_(bias.to(dtype))
        return module

    @property
    def dictionary_shared(self) -> bool:
        """Whether other modules hold the same dictionary (this one is charged a share of it)."""
        return self.dictionary_share != self.in_features * self.atoms

    def with_quantized(self, values: QuantizedLinear, dictionary: QuantizedLinear | None) -> "SparseDictLinear":
        """A new module with this one's indices and bias, ``values`` (s inputs → out outputs) as its values and
        ``dictionary`` (in → k) as its dictionary, or this one's (the same Parameter: a shared dictionary
        stays shared)."""
        device = self.packed_indices.device
        module = type(self)(self.in_features, self.out_features, self.atoms, self.sparsity, bias=self.bias is not None,
                            dtype=self.dtype, device=device, dictionary=self.dictionary if dictionary is None else None,
                            dictionary_share=self.dictionary_share, quantized_values=values,
                            quantized_dictionary=dictionary)
        with torch.no_grad():
            module.packed_indices.copy_(self.packed_indices)
            module.indices.copy_(self.indices)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    @torch.no_grad()
    def balance_atoms(self) -> bool:
        """Rescale every atom D[:, j] by c_j and the values that use it by 1/c_j so that the atom and its row of S
        have equal norms: the product D·S, the function, is unchanged (up to float rounding), as SVD's √Σ split
        of a low-rank pair. Why: the pursuit leaves atoms with the whitening folded in (norms ~1e-2 on
        SmolLM2) beside values ~10, and Adam's step is absolute, so a step that barely moves a value rewrites
        an atom (a distillation at lr 3e-5 diverged at its second step). An atom no value uses keeps its
        scale. Only a float dictionary of this module alone, with float values, is balanced; the return says
        whether it was."""
        if self.dictionary is None or self.values is None or self.dictionary_shared:
            return False
        dictionary, values = self.dictionary.float(), self.values.float()
        rows = torch.zeros(self.atoms, dtype=torch.float32, device=values.device)
        rows.index_add_(0, self.indices.long().flatten(), values.pow(2).flatten())
        atoms = dictionary.pow(2).sum(0)
        scale = torch.where((rows > 0) & (atoms > 0), (rows / atoms.clamp_min(1e-30)).pow(0.25), torch.ones_like(rows))
        self.dictionary.copy_(dictionary * scale)
        self.values.copy_(values / scale[self.indices.long()])
        return True

    def dictionary_matrix(self) -> torch.Tensor:
        """D, in × k (dequantized when stored quantized)."""
        if self.dictionary is not None:
            return self.dictionary
        return self.quantized_dictionary.dense_weight().T

    def value_matrix(self) -> torch.Tensor:
        """The s × out nonzero values (dequantized when stored quantized)."""
        if self.values is not None:
            return self.values
        return self.quantized_values.dense_weight().T

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load the packed indices (packing a legacy int16/int32 ``indices`` tensor), then unpack them
        once into the forward's ``indices``."""
        legacy = state_dict.pop(prefix + "indices", None)
        if legacy is not None and prefix + "packed_indices" not in state_dict:
            state_dict[prefix + "packed_indices"] = pack_codes(legacy, index_bits(self.atoms))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.packed_indices.device.type != "meta":
            self.unpack_indices()

    def unpack_indices(self) -> None:
        """Rebuild ``indices`` from ``packed_indices`` (after the packed tensor was replaced)."""
        codes = unpack_codes(self.packed_indices, index_bits(self.atoms), self.sparsity * self.out_features,
                             index_dtype_for(self.atoms))
        self.indices = codes.view(self.sparsity, self.out_features)

    def prepare_inference(self) -> None:
        on_cpu = self.packed_indices.device.type == "cpu"
        self._coefficients = self.coefficients().detach() if on_cpu else None

    def inference_tensors(self) -> list[torch.Tensor]:
        return [] if self._coefficients is None else [self._coefficients]

    def release_inference(self) -> None:
        self._coefficients = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.dictionary if self.dictionary is not None else self.quantized_dictionary(x)
        prepared = self._coefficients
        if prepared is not None and x.device.type == "cpu" and not x.requires_grad:
            y = z @ prepared.to(z.dtype)
        else:
            y = triton_kernels.sparse_dict_matmul(z, self.indices, self.value_matrix().to(z.dtype))
        return y + self.bias if self.bias is not None else y

    def coefficients(self) -> torch.Tensor:
        """S as a dense k × out matrix."""
        values = self.value_matrix().to(self._value_dtype())
        dense = torch.zeros(self.atoms, self.out_features, dtype=values.dtype, device=values.device)
        return dense.scatter_add_(0, self.indices.long(), values)

    def dense_weight(self) -> torch.Tensor:
        return (self.dictionary_matrix() @ self.coefficients()).T

    def _value_dtype(self) -> torch.dtype:
        """The model dtype (the float dictionary's, else the values', else the one built with)."""
        float_tensor = self.dictionary if self.dictionary is not None else self.values
        return float_tensor.dtype if float_tensor is not None else self.dtype

    def index_params(self) -> int:
        """The indices in units of stored values (bytes of indices / bytes per value, rounded up)."""
        return index_params(self.indices.numel(), self.atoms, self._value_dtype())

    def stored_params(self) -> int:
        return sparse_dict_params(self.in_features, self.out_features, self.atoms, self.sparsity, self._value_dtype(),
                                  self.bias is not None, self.dictionary_share)

    def storage_bytes(self) -> int:
        """Checkpoint bytes, with a shared dictionary charged at this module's share (quantized values at the
        bytes of their packed module)."""
        tensors = [self.packed_indices] + ([self.bias] if self.bias is not None else [])
        tensors += [self.values] if self.values is not None else []
        values = 0 if self.values is not None else storage_bytes(self.quantized_values)
        dictionary = (self.dictionary_share * self.dictionary.element_size() if self.dictionary is not None
                      else storage_bytes(self.quantized_dictionary))
        return dictionary + values + sum(t.numel() * t.element_size() for t in tensors)

    def spec(self) -> dict[str, Any]:
        spec = {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "atoms": self.atoms, "sparsity": self.sparsity, "bias": self.bias is not None,
                "index_bits": index_bits(self.atoms), "dictionary_share": self.dictionary_share}
        if self.values is None:
            spec["values"] = module_spec(self.quantized_values)
        if self.dictionary is None:
            spec["dictionary"] = module_spec(self.quantized_dictionary)
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> "SparseDictLinear":
        values = module_from_spec(spec["values"], dtype) if "values" in spec else None
        dictionary = module_from_spec(spec["dictionary"], dtype) if "dictionary" in spec else None
        module = cls(spec["in_features"], spec["out_features"], spec["atoms"], spec["sparsity"],
                     bias=spec["bias"], dtype=dtype, dictionary_share=spec.get("dictionary_share"),
                     quantized_values=values, quantized_dictionary=dictionary)
        bits = spec.get("index_bits")       # absent: a checkpoint of the unpacked layout (loaded by packing)
        if bits is not None and bits != index_bits(module.atoms):
            raise ValueError(f"{bits}-bit indices do not match {spec['atoms']} atoms")
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.atoms}, "
                f"sparsity={self.sparsity}, index_bits={index_bits(self.atoms)}")
