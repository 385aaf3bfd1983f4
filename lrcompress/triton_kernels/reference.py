"""Pure-torch references of the Triton kernels: what runs without a GPU, and what the kernels are
tested against. Each function has the same signature and in-place semantics as its kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.packing import dequantize


def sparse_dict_matmul(z: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """y[..., j] = Σ_t z[..., indices[t, j]] · values[t, j]  (z: [..., k]; indices, values: [s, n]).

    Computed by scattering the fixed-nnz columns into a dense k×n matrix and one matmul: the
    gather form would materialize [tokens, s, n]."""
    k = z.shape[-1]
    dense = torch.zeros(k, values.shape[1], dtype=values.dtype, device=values.device)
    dense.scatter_add_(0, indices.long(), values)
    return z @ dense.to(z.dtype)


def omp_step(gram: torch.Tensor, alpha: torch.Tensor, alpha0: torch.Tensor, support: torch.Tensor,
             linv: torch.Tensor, y: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor,
             step: int, tol: float) -> None:
    """One Batch-OMP step for every column at once: select, then append a row to L⁻¹.

    State (B columns, k atoms, s slots): ``alpha`` [B, k] correlations of the residual with the atoms;
    ``alpha0`` [B, k] those of the signal; ``support`` [B, s] chosen atoms; ``linv`` [B, s, s] the
    inverse of the Cholesky factor L of G[I, I] (G = DᵀD); ``y`` [B, s] = L⁻¹·alpha0[I], the
    coefficients in the orthonormalized basis Q = D_I·L⁻ᵀ; ``selected`` [B, k] bool; ``valid`` [B, s]
    bool (False for a slot whose atom is already in the span: the column is exactly represented and
    the slot gets a zero coefficient, decoupled from the others). Updates everything but ``alpha``
    in place; the caller then subtracts y_t·(Dᵀq_t) from ``alpha`` with one GEMM.
    """
    t = step
    rows = torch.arange(alpha.shape[0], device=alpha.device)
    score = alpha.abs().masked_fill(selected, -1.0)
    atom = score.argmax(dim=1)
    selected[rows, atom] = True
    support[:, t] = atom
    g_ii = gram[atom, atom]
    g = gram[support[:, :t], atom[:, None]] * valid[:, :t]                       # G[I, i], [B, t]
    rows_t = linv[:, :t, :]           # whole rows (zero beyond the diagonal): a strided view, no copy
    w = torch.bmm(rows_t[:, :, :t], g.unsqueeze(-1)).squeeze(-1) if t else g     # L⁻¹·g
    d2 = g_ii - (w * w).sum(dim=1)
    ok = d2 > tol * g_ii
    delta = torch.where(ok, d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt(), torch.ones_like(d2))
    w = w * ok[:, None]
    linv[:, t, :t] = -torch.bmm(w.unsqueeze(1), rows_t).squeeze(1)[:, :t] / delta[:, None]
    linv[:, t, t] = 1.0 / delta
    y[:, t] = torch.where(ok, (alpha0[rows, atom] - (w * y[:, :t]).sum(dim=1)) / delta, torch.zeros_like(d2))
    valid[:, t] = ok


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bits: int, group_size: int, perm: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Ŵᵀ + b, Ŵ[n, k] = (q[n, k] − z[n, g(k)])·s[n, g(k)] rounded to x's dtype, y in x's dtype.

    ``qweight``: the packed codes (out × in, stored column order; ``core/packing.py``); ``scales``
    (float values) and ``zeros`` (uint8): out × groups, groups of ``group_size`` stored columns, the
    last one possibly shorter; ``perm``: stored column k is input perm[k]. The weight is the module's own
    dequantization (``core.packing.dequantize``, float32, exact), so this shares no code with the kernel.
    """
    weight = dequantize(qweight, scales, zeros, bits, group_size, perm, x.shape[-1])
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
