"""Quantized factors: ``rtn``/``gptq`` with ``apply_to: factors`` quantize the factors that an earlier stage
made, instead of the module's m×n product (docs/quantized-factors.md).

* ``LowRankLinear`` (svd, whiten, lord, fwsvd): both factors of y = B·(A·x). A (r × n, ``down``) reads the
  module's input x, so its GPTQ Hessian is the input Gram G = XᵀX. B (m × r, ``up``) reads z = A_q·x, the
  rank-r activations of the *quantized* first factor, so A is quantized first and B's Hessian is ZᵀZ with
  Z = X·A_qᵀ, i.e. A_q·G·A_qᵀ (:func:`rank_gram`): exact, computed from the input Gram the stage already
  collected, so no second pass over the calibration data is needed.
* ``SparseDictLinear`` (cospadi, compot): the dictionary D (in × k; a linear with weight Dᵀ reading x, so
  its Hessian is G, as for ``down``) when this module alone holds it, then the nonzero values of S. Output
  column j is y_j = Σ_t z_{idx[t, j]}·v[t, j] with z = x·D_q, so its values' Hessian is the block of D_qᵀ·G·D_q
  on its support idx[:, j] (:func:`value_grams`): one s × s Hessian per output column (``gptq.gptq_rows``).
  A dictionary shared by a group of modules (``group_size`` > 1) keeps the model dtype: each member would
  round it differently, and it would no longer be one tensor; its values are still quantized.

rtn needs no Hessian: it rounds each factor on the same grid. The stored layout is the one of ``rtn``/``gptq``
(a ``QuantizedLinear`` per factor, packed by ``core.packing``), nested in the factored module's spec.
:func:`planned` gives a spec's exact size from a meta-device skeleton; :func:`low_rank_bytes` is the
one-call price of a (quantized) rank-r pair for budget allocation.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import LrcompressError
from ..modules import LowRankLinear, QuantizedLinear, SparseDictLinear, dense_weight, module_from_spec, storage_bytes
from ..modules import stored_params
from .base import CompressResult, Plan
from .quantgrid import QuantConfig


class MatrixQuantizer(Protocol):
    """What quantize_factors needs of rtn/gptq (rtn.QuantizingCompressor); a protocol, so that this module,
    which rtn imports, does not import rtn back."""

    name: str

    def quantize_matrix(self, *args: Any, **kwargs: Any) -> Any: ...

    def quantize_rows(self, *args: Any, **kwargs: Any) -> Any: ...


FACTORED = "a low-rank (svd, whiten, lord, fwsvd) or dictionary (cospadi, compot) stage"


def not_factored(name: str, method: str, found: str) -> LrcompressError:
    return LrcompressError(f"{name}: {method} with apply_to: factors quantizes the factors of {FACTORED} placed "
                           f"before it on the same module, but this module is {found}; put such a stage first, "
                           "or use apply_to: weight (the default) to quantize the whole weight")


def already_quantized(name: str, method: str) -> LrcompressError:
    return LrcompressError(f"{name}: its factors are already quantized by an earlier apply_to: factors stage; "
                           f"remove one of the two quantization stages ({method})")


def rank_gram(down: nn.Module, gram: torch.Tensor) -> torch.Tensor:
    """The Gram of the rank-r activations Z = X·A_qᵀ of the quantized first factor: A_q·G·A_qᵀ (float64).
    Exact from the input Gram G = XᵀX, so no data pass is needed."""
    a = dense_weight(down).detach().to(torch.float64)
    return a @ gram.to(a) @ a.T


def value_grams(dictionary: torch.Tensor, indices: torch.Tensor, gram: torch.Tensor
                ) -> Callable[[slice], torch.Tensor]:
    """For a slice of output columns j, the (columns × s × s) Hessians of their values: the blocks
    (DᵀGD)[idx_j, idx_j] of the Gram of the dictionary outputs z = x·D (D: in × k, the dictionary the
    values will be used with; float64). Exact from the input Gram: no data pass."""
    d = dictionary.detach().to(torch.float64)
    atoms = d.T @ gram.to(d) @ d

    def grams(columns: slice) -> torch.Tensor:
        support = indices[:, columns].T.long()                         # columns × s
        return atoms[support[:, :, None], support[:, None, :]]
    return grams


def quantize_factors(quantizer: MatrixQuantizer, name: str, module: nn.Module,
                     gram: torch.Tensor | None) -> CompressResult:
    """The replacement of a factored ``module`` with its factors quantized by ``quantizer`` (``gram``: the
    module's input Gram for a Hessian-based quantizer, else None)."""
    if isinstance(module, LowRankLinear):
        if module.factors_quantized:
            raise already_quantized(name, quantizer.name)
        down, down_path, down_details = quantizer.quantize_matrix(module.down.weight.detach(), gram, None,
                                                                  f"{name}.down")
        up_gram = None if gram is None else rank_gram(down, gram)
        up, up_path, up_details = quantizer.quantize_matrix(module.up.weight.detach(), up_gram, module.up.bias,
                                                            f"{name}.up")
        return CompressResult(LowRankLinear.from_modules(down, up), rank=module.rank,
                              numerical_path=f"down {down_path}; up {up_path}",
                              details={"factors": "down, up", "down": down_details, "up": up_details,
                                       **_shared(down_details)})
    if isinstance(module, SparseDictLinear):
        if module.values is None:
            raise already_quantized(name, quantizer.name)
        dictionary, paths, details = None, [], {}
        if not module.dictionary_shared:
            dictionary, path, details["dictionary"] = quantizer.quantize_matrix(module.dictionary.detach().T, gram,
                                                                                None, f"{name}.dictionary")
            paths.append(f"dictionary {path}")
        hessians = None if gram is None else value_grams(
            module.dictionary if dictionary is None else dictionary.dense_weight().T, module.indices, gram)
        values, path, details["values"] = quantizer.quantize_rows(module.values.detach().T, hessians, f"{name}.values")
        paths.append(f"values {path}")
        return CompressResult(module.with_quantized(values, dictionary), numerical_path="; ".join(paths),
                              details={"factors": ", ".join(details), **details, **_shared(details["values"])})
    raise not_factored(name, quantizer.name, type(module).__name__)


def _shared(details: dict[str, Any]) -> dict[str, Any]:
    return {key: details[key] for key in ("bits", "group_size") if key in details}


def quantized_spec(in_features: int, out_features: int, config: QuantConfig, bias: bool) -> dict[str, Any]:
    """The spec of the ``QuantizedLinear`` that ``config`` makes of an out × in factor."""
    return {"kind": QuantizedLinear.kind, "in_features": in_features, "out_features": out_features,
            "bits": config.bits, "group_size": config.width(in_features), "scale_dtype": config.scale_dtype,
            "act_order": bool(getattr(config, "act_order", False)), "bias": bias}


def factor_spec(name: str, spec: dict[str, Any] | None, config: QuantConfig, method: str) -> dict[str, Any]:
    """The spec of the module an ``apply_to: factors`` stage makes of the module ``spec`` describes (the
    planned output of the stages before it), or the error the run would raise."""
    kind = spec.get("kind") if spec else None
    if kind == LowRankLinear.kind:
        if "factors" in spec:
            raise already_quantized(name, method)
        n, m, r = spec["in_features"], spec["out_features"], spec["rank"]
        return {**spec, "factors": {"down": quantized_spec(n, r, config, False),
                                    "up": quantized_spec(r, m, config, spec["bias"])}}
    if kind == SparseDictLinear.kind:
        if "values" in spec:
            raise already_quantized(name, method)
        if getattr(config, "act_order", False):
            raise LrcompressError(f"{name}: act_order cannot apply to dictionary values (every output column has "
                                  "its own Hessian, hence its own order, and the layout stores one order); "
                                  "set act_order: false")
        quantized = {"values": quantized_spec(spec["sparsity"], spec["out_features"], config, False)}
        if spec.get("dictionary_share", spec["in_features"] * spec["atoms"]) == spec["in_features"] * spec["atoms"]:
            quantized["dictionary"] = quantized_spec(spec["in_features"], spec["atoms"], config, False)
        return {**spec, **quantized}
    raise not_factored(name, method, f"planned as {kind}" if kind else "not factored by an earlier stage")


def planned(spec: dict[str, Any], dtype: torch.dtype) -> Plan:
    """The exact size of the module ``spec`` describes, from a skeleton on the meta device (no memory)."""
    with torch.device("meta"):
        skeleton = module_from_spec(spec, dtype)
    return Plan(stored_params(skeleton), rank=spec.get("rank"), bytes_after=storage_bytes(skeleton), spec=spec)



class _FactorGrid(QuantConfig):
    """A grid and whether codes are stored in act order: all that the bytes depend on (GPTQConfig's other
    fields do not change them, and importing gptq here would close the cycle rtn -> factors -> gptq -> rtn)."""

    act_order: bool = False


def low_rank_bytes(module: nn.Module, rank: int, bits: int | None = None, group_size: int | None = 128,
                   scale_dtype: str = "float16", act_order: bool = False) -> int:
    """Exact checkpoint bytes of ``module`` (a Linear, out × in) stored as a rank-``rank`` pair, with both
    factors quantized to ``bits`` in groups of ``group_size`` inputs (``bits`` None: factors in the weight's
    dtype). The bias is kept in the weight's dtype. What ``plan()`` and the record report for it."""
    bias = getattr(module, "bias", None) is not None
    spec = {"kind": LowRankLinear.kind, "in_features": module.in_features, "out_features": module.out_features,
            "rank": rank, "bias": bias}
    if bits is not None:
        config = _FactorGrid(bits=bits, group_size=group_size, scale_dtype=scale_dtype, act_order=act_order)
        spec = factor_spec(type(module).__name__, spec, config, "low_rank_bytes")
    return planned(spec, dense_weight(module).dtype).bytes_after
