"""Sparse coding and dictionary learning: batched OMP, K-SVD, and the least-squares refit of values.

Orientation: signals are the columns of X (n × N); a dictionary D is n × k with unit-norm atoms; a
code has exactly s entries per column, stored in the fixed-nnz layout indices/values [s, N].

Batched OMP is Batch-OMP (Rubinstein, Zibulevsky & Elad 2008) run for all columns at once: it works
on the Gram G = DᵀD and the correlations DᵀX only and never touches the signals. It adds one atom per
step (OMP) or b atoms per step (generalized OMP, Wang, Kwon & Shim 2012). Two forms of OMP itself
(same supports, same values; tested against textbook OMP):
- on CUDA with Triton and one atom a step, the step kernel grows the inverse Cholesky factor L⁻¹ of
  G[I, I] one row per step (``triton_kernels.omp_step``) and α ← α − y_t·Dᵀq_t is one GEMM over all
  columns (k² per column and step: cheap on a GPU);
- everywhere else, the Gram–Schmidt block form: it keeps P = [Dᵀq_0; …; Dᵀq_{t−1}] (the correlations
  of the orthonormalized chosen atoms), so w = Q_Iᵀd_a is a gather from P, and the b new directions
  Dᵀr_a = G[:, a] − Pᵀw_a are one batched product that reads P once per step (k·s²/2 per column over
  the pursuit instead of the GEMM's k²·s: 4× less for s = k/2); a b × b Cholesky orthonormalizes
  them, and L = [[w, R]] is kept to recover the coefficients at the end (Lᵀγ = y). With b = 1 the
  product is a matrix-vector one, bound by memory on a CPU; with b atoms it is b times denser.
Nothing loops over columns in Python.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch

from .. import triton_kernels

log = logging.getLogger(__name__)

OMP_STATE_BUDGET = 1 << 24      # elements of L⁻¹ ([columns, s, s]) held at once: chunks columns
GS_CHUNK_BYTES = 8 << 20        # bytes of P ([columns, s, k]) per chunk of the Gram–Schmidt form: a chunk
                                # that stays in cache is 2–3× faster than one streamed from memory
REFIT_CHUNK_BYTES = 2 << 20     # bytes of the sub-Grams ([columns, s, s]) per chunk of the refit (same reason)
SPAN_TOL = 1e-10                # δ² ≤ tol·G_ii: the atom lies in the span of the chosen ones
POWER_TOL = 1e-7                # rank-1 power iteration stops when σ changes less than this, relatively
DUPLICATE_COS = 0.99            # K-SVD practice: an atom this close to another one is re-seeded,
RARE_USE = 0.25                 # ... and so is one used by under a quarter of the average atom's columns
ORTHONORMAL_TOL = 1e-9          # ‖DᵀD − I‖_max below max(this, 1000·eps of the dtype): OMP reduces to the
                                # top-s projections (float32: 1.2e-4, the round-off of a float64-orthonormal D)


def batched_omp(gram: torch.Tensor, correlations: torch.Tensor, sparsity: int,
                atoms_per_step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP with exactly ``sparsity`` atoms for every column of X, given G = DᵀD [k, k] and DᵀX [k, N].

    ``atoms_per_step`` > 1 is generalized OMP (gOMP, Wang, Kwon & Shim 2012): each step adds the
    atoms of that many largest |correlations| at once and refits, which reads the pursuit's state once
    per step instead of once per atom (CoSpaDi's default: ``cospadi.pursuit_atoms_per_step``).

    Returns (indices [s, N] int64 in selection order, values [s, N] = least squares on the support),
    in the dtype of the inputs. A column already represented exactly before s atoms gets zero values
    on its remaining slots (atoms still distinct). For an orthonormal D the greedy selection is the
    top-s of |DᵀX| and the values are the projections: that case (the SVD initialization of K-SVD)
    skips the iteration.
    """
    k, n_cols = correlations.shape
    if not 1 <= sparsity <= k:
        raise ValueError(f"sparsity {sparsity} must be between 1 and the number of atoms {k}")
    if atoms_per_step < 1:
        raise ValueError(f"atoms_per_step must be at least 1, got {atoms_per_step}")
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    if (gram - eye).abs().max().item() < max(ORTHONORMAL_TOL, 1e3 * torch.finfo(gram.dtype).eps):
        top = correlations.abs().topk(sparsity, dim=0).indices
        return top, correlations.gather(0, top)
    kernel = atoms_per_step == 1 and triton_kernels.use_triton(gram, correlations)
    pursuit = _omp_chunk if kernel else functools.partial(_omp_chunk_gram_schmidt, per_step=atoms_per_step)
    if kernel:
        chunk = max(1, min(n_cols, OMP_STATE_BUDGET // (sparsity * sparsity)))
    else:
        chunk = max(1, min(n_cols, GS_CHUNK_BYTES // (sparsity * k * correlations.element_size())))
    indices, values = [], []
    for start in range(0, n_cols, chunk):
        idx, val = pursuit(gram, correlations[:, start:start + chunk].T.contiguous(), sparsity)
        indices.append(idx)
        values.append(val)
    return torch.cat(indices, dim=1), torch.cat(values, dim=1)


def _omp_chunk(gram: torch.Tensor, alpha0: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, k = alpha0.shape
    dev, dtype = alpha0.device, alpha0.dtype
    alpha = alpha0.clone()
    support = torch.zeros(batch, s, dtype=torch.int64, device=dev)
    linv = torch.zeros(batch, s, s, dtype=dtype, device=dev)
    y = torch.zeros(batch, s, dtype=dtype, device=dev)
    selected = torch.zeros(batch, k, dtype=torch.bool, device=dev)
    valid = torch.zeros(batch, s, dtype=torch.bool, device=dev)
    scattered = torch.zeros(batch, k, dtype=dtype, device=dev)
    for t in range(s):
        triton_kernels.omp_step(gram, alpha, alpha0, support, linv, y, selected, valid, t, SPAN_TOL)
        if t + 1 == s:
            break
        # Dᵀq_t = G[:, I]·(row t of L⁻¹): scatter the row into k slots, one GEMM for all columns.
        scattered.zero_()
        scattered.scatter_(1, support[:, : t + 1], linv[:, t, : t + 1])
        alpha.sub_(y[:, t : t + 1] * (scattered @ gram))
    coefficients = torch.bmm(y.unsqueeze(1), linv).squeeze(1)          # γ = L⁻ᵀ y
    return support.T.contiguous(), coefficients.T.contiguous()


def _omp_chunk_gram_schmidt(gram: torch.Tensor, alpha0: torch.Tensor, s: int,
                            per_step: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The pursuit of ``_omp_chunk`` in Gram–Schmidt form (module docstring): no L⁻¹ and no k×k GEMM.

    Each step adds the ``per_step`` atoms of largest |α| (1: OMP itself). With r_a = d_a − Σ_j w_aj q_j
    for the block's atoms a (w_aj = q_jᵀd_a = P[j, a]): Dᵀr_a = G[:, a] − Pᵀw_a for all of them is one
    batched product that reads P once, C = [r_aᵀr_c] is gathered from it, and C = R·Rᵀ (Cholesky, b × b)
    gives the block's orthonormal directions Dᵀq = R⁻¹·Dᵀr, their values y = R⁻¹·α_block (the residual
    is orthogonal to q_<t), and the block's rows [w, R] of L (D_I = Q·Lᵀ, so γ = L⁻ᵀy). An atom in the
    span of the chosen ones (δ² ≤ tol·G_aa) gets row [0, 1], q = 0 and y = 0: a decoupled zero value,
    as in the step kernel.
    """
    batch, k = alpha0.shape
    dev, dtype = alpha0.device, alpha0.dtype
    alpha = alpha0.clone()
    p = torch.zeros(batch, s, k, dtype=dtype, device=dev)
    lower = torch.zeros(batch, s, s, dtype=dtype, device=dev)
    y = torch.zeros(batch, s, dtype=dtype, device=dev)
    support = torch.zeros(batch, s, dtype=torch.int64, device=dev)
    selected = torch.zeros(batch, k, dtype=torch.bool, device=dev)
    diagonal = torch.diagonal(gram)
    eye = torch.eye(per_step, dtype=dtype, device=dev)
    t = 0
    while t < s:
        b = min(per_step, s - t)
        atoms = alpha.abs().masked_fill_(selected, -1.0).topk(b, dim=1).indices             # [B, b]
        selected.scatter_(1, atoms, True)
        support[:, t:t + b] = atoms
        raw = gram.index_select(0, atoms.flatten()).view(batch, b, k)                      # Dᵀd_a
        if t:
            w = p[:, :t, :].gather(2, atoms[:, None, :].expand(batch, t, b))                # [B, t, b]
            raw = torch.baddbmm(raw, w.mT, p[:, :t, :], alpha=-1.0)                         # Dᵀr_a
        cross = raw.gather(2, atoms[:, None, :].expand(batch, b, b))                         # r_aᵀr_c
        factor, independent = _block_factor(cross, diagonal[atoms])
        inverse = torch.linalg.solve_triangular(factor, eye[:b, :b].expand(batch, b, b), upper=False)
        inverse.mul_(independent[:, :, None])                                               # q = 0 in the span
        p[:, t:t + b, :] = torch.bmm(inverse, raw)
        y[:, t:t + b] = torch.bmm(inverse, alpha.gather(1, atoms).unsqueeze(-1)).squeeze(-1)
        lower[:, t:t + b, t:t + b] = factor
        if t:
            lower[:, t:t + b, :t] = w.mT * independent[:, :, None]
        alpha.sub_(torch.bmm(y[:, None, t:t + b], p[:, t:t + b, :]).squeeze(1))
        t += b
    coefficients = torch.linalg.solve_triangular(lower.mT, y.unsqueeze(-1), upper=True).squeeze(-1)
    return support.T.contiguous(), coefficients.T.contiguous()


def _block_factor(cross: torch.Tensor, g_aa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of a block's [B, b, b] Gram C and which of its atoms are independent.

    Batched Cholesky first; the columns where it fails or where a pivot falls to δ² ≤ tol·G_aa (an atom
    in the span of the chosen ones) are redone one atom at a time, each dependent atom getting row
    [0, 1] so that it decouples."""
    factor, info = torch.linalg.cholesky_ex(cross)
    pivots = factor.diagonal(dim1=1, dim2=2)
    independent = (pivots * pivots > SPAN_TOL * g_aa) & (info == 0)[:, None]
    redo = (~independent).any(dim=1).nonzero().flatten()
    if len(redo):
        factor[redo], independent[redo] = _sequential_factor(cross[redo], g_aa[redo])
    return factor, independent


def _sequential_factor(cross: torch.Tensor, g_aa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_block_factor`` one pivot at a time, decoupling each atom in the span of the earlier ones."""
    batch, b, _ = cross.shape
    tiny = torch.finfo(cross.dtype).tiny
    factor = torch.zeros_like(cross)
    independent = torch.ones(batch, b, dtype=torch.bool, device=cross.device)
    for a in range(b):
        row = cross[:, a, :a].clone()
        for c in range(a):                                       # forward substitution: R[a, c]
            row[:, c] = (row[:, c] - (row[:, :c] * factor[:, c, :c]).sum(dim=1)) / factor[:, c, c]
            row[:, c] *= independent[:, c]                       # a dependent atom's q is 0
        d2 = cross[:, a, a] - (row * row).sum(dim=1)
        independent[:, a] = d2 > SPAN_TOL * g_aa[:, a]
        factor[:, a, :a] = row * independent[:, a, None]         # a dependent atom's row is [0, 1]
        factor[:, a, a] = torch.where(independent[:, a], d2.clamp_min(tiny).sqrt(), torch.ones_like(d2))
    return factor, independent


def refit_values(gram: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
                 ridge: float = 1e-12) -> tuple[torch.Tensor, int]:
    """Least-squares values on fixed supports: for each column j, solve G[I_j, I_j]·v = b[I_j, j].

    ``gram`` is AᵀMA and ``targets`` AᵀMW for a metric M (M = I in the whitened space, or one layer's
    own XᵀX for a shared dictionary). A relative ``ridge`` keeps exactly dependent supports solvable;
    columns whose Cholesky still fails go through a least-squares solver. Returns (values, failures).
    """
    s, n_cols = indices.shape
    k = gram.shape[0]
    scale = torch.diagonal(gram).mean().clamp_min(torch.finfo(gram.dtype).tiny)
    chunk = max(1, REFIT_CHUNK_BYTES // (s * s * gram.element_size()))
    flat = gram.reshape(-1)
    out = torch.empty(s, n_cols, dtype=gram.dtype, device=gram.device)
    failures = 0
    for start in range(0, n_cols, chunk):
        idx = indices[:, start:start + chunk].T                          # [B, s]
        sub = flat[idx[:, :, None] * k + idx[:, None, :]]                # G[I, I]: one flat gather
        sub.diagonal(dim1=-2, dim2=-1).add_(ridge * scale)
        rhs = targets[:, start:start + chunk].gather(0, idx.T).T.unsqueeze(-1)
        factor, info = torch.linalg.cholesky_ex(sub)
        # two triangular solves: the same as cholesky_solve, several times faster on a CPU batch
        solved = torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, rhs, upper=False),
                                               upper=True)
        bad = (info != 0).nonzero().flatten()
        if len(bad):
            failures += len(bad)
            solved[bad] = torch.linalg.lstsq(sub[bad], rhs[bad]).solution
        out[:, start:start + chunk] = solved.squeeze(-1).T
    return out, failures


def dense_codes(indices: torch.Tensor, values: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """The k × N coefficient matrix of a fixed-nnz code."""
    dense = torch.zeros(n_atoms, indices.shape[1], dtype=values.dtype, device=values.device)
    return dense.scatter_add_(0, indices, values)


@dataclass
class KSVDResult:
    dictionary: torch.Tensor              # n × k, unit-norm atoms
    indices: torch.Tensor                 # s × N int64
    values: torch.Tensor                  # s × N
    errors: list[float] = field(default_factory=list)   # ‖X − DS‖/‖X‖ after each iteration run
    reseeded: int = 0                     # atoms re-seeded because no column used them
    best: int = 0                         # the iteration (0-based) whose dictionary and code are returned
    stopped_early: bool = False           # the relative error stopped improving before the last iteration


def initial_dictionary(signals: torch.Tensor, n_atoms: int, seed: int) -> torch.Tensor:
    """Leading left singular vectors of X; beyond its rank, normalized columns of X (seeded pick)."""
    u, sv, _ = torch.linalg.svd(signals, full_matrices=False)
    rank = int((sv > sv[0] * max(signals.shape) * torch.finfo(signals.dtype).eps).sum()) if len(sv) else 0
    atoms = [u[:, : min(rank, n_atoms)]]
    missing = n_atoms - atoms[0].shape[1]
    if missing > 0:
        g = torch.Generator().manual_seed(seed)
        picks = torch.randperm(signals.shape[1], generator=g)[:missing]
        extra = signals[:, picks.to(signals.device)]
        if extra.shape[1] < missing:   # fewer columns than atoms: random directions
            extra = torch.cat([extra, torch.randn(signals.shape[0], missing - extra.shape[1], generator=g,
                                                  dtype=signals.dtype).to(signals.device)], dim=1)
        atoms.append(_normalize(extra))
    return torch.cat(atoms, dim=1)


def _normalize(atoms: torch.Tensor) -> torch.Tensor:
    norms = atoms.norm(dim=0, keepdim=True)
    return atoms / torch.where(norms > 0, norms, torch.ones_like(norms))


def ksvd(signals: torch.Tensor, n_atoms: int, sparsity: int, iterations: int, seed: int = 0,
         init: torch.Tensor | None = None, power_steps: int = 30, dtype: torch.dtype | None = None,
         tolerance: float = 0.0, atoms_per_step: int = 1) -> KSVDResult:
    """K-SVD (Aharon, Elad & Bruckstein 2006) on the columns of ``signals``.

    Each iteration: sparse-code every column with batched OMP, then update the atoms one after the
    other: atom j and its coefficients become the rank-1 approximation of the residual restricted to
    the columns that use j, computed by power iteration warm-started from the current (atom,
    coefficients) — every step of it is an exact alternating least-squares step, so an update never
    increases the error; it runs until σ settles (the approximate K-SVD's single step recovers
    markedly fewer atoms). Between iterations, atoms that are unused, rarely used or duplicates of
    another atom are re-seeded with the worst-approximated signals (normalized), as in K-SVD
    practice: this is what gets K-SVD out of the local minima where one atom mixes two true ones.

    ``dtype`` (default the signals' dtype) is the precision of both stages; the SVD initialization
    runs in the signals' dtype and the dictionary is returned in it. Re-seeding can raise the error,
    so the iteration with the lowest error is returned (``best``). ``tolerance`` > 0 stops early
    when an iteration lowers the relative error by less than ``tolerance`` times its previous value.
    ``atoms_per_step`` is the sparse coding's (``batched_omp``).
    """
    dtype = dtype or signals.dtype
    start = _normalize(init.clone()) if init is not None else initial_dictionary(signals, n_atoms, seed)
    dictionary = start.to(dtype)
    x = signals.to(dtype)
    x_norm = x.norm().clamp_min(torch.finfo(dtype).tiny)
    result = KSVDResult(dictionary, torch.empty(0), torch.empty(0))
    for iteration in range(iterations):
        indices, values = batched_omp(dictionary.T @ dictionary, dictionary.T @ x, sparsity, atoms_per_step)
        codes = dense_codes(indices, values, n_atoms)
        residual = x - dictionary @ codes
        unused = _update_atoms(dictionary, codes, residual, power_steps)
        error = (residual.norm() / x_norm).item()
        result.errors.append(error)
        if iteration == 0 or error < result.errors[result.best]:
            result.best = iteration
            result.dictionary, result.indices, result.values = dictionary.clone(), indices, codes.gather(0, indices)
        if iteration + 1 == iterations:
            break
        if tolerance > 0 and iteration and result.errors[-2] - error <= tolerance * result.errors[-2]:
            result.stopped_early = True
            break
        # a re-seeded atom needs a new sparse coding to be used (none after the last iteration, so
        # every stored index points at the atom it was coded with)
        replace = unused + _rarely_used(codes) + _duplicates(dictionary)
        result.reseeded += _reseed(dictionary, x, residual, replace)
    result.dictionary = result.dictionary.to(signals.dtype)
    result.values = result.values.to(signals.dtype)
    return result


def _update_atoms(dictionary: torch.Tensor, codes: torch.Tensor, residual: torch.Tensor,
                  power_steps: int) -> list[int]:
    """The K-SVD dictionary stage, in place on all three tensors; returns the unused atoms."""
    return [j for j in range(dictionary.shape[1]) if not update_atom(dictionary, codes, residual, j, power_steps)]


def update_atom(dictionary: torch.Tensor, codes: torch.Tensor, residual: torch.Tensor, j: int,
                power_steps: int) -> bool:
    """Replace atom j and its nonzero coefficients by the rank-1 approximation of the residual on the
    columns that use it (in place, residual kept equal to X − D·S). False when no column uses it.

    E_ω = R_ω + d·cᵀ is never gathered: with c zero outside ω, E_ω·c = R·c + d·(cᵀc) and
    aᵀE_ω = (aᵀR + (aᵀd)·cᵀ) restricted to ω are full-width GEMVs, and R ← R + d·cᵀ − a·c'ᵀ is two
    rank-1 updates (zero outside ω). Same arithmetic as on the gathered block, without its copies.
    """
    old_coef = codes[j]
    users = old_coef != 0
    if not bool(users.any()):
        return False
    old_atom = dictionary[:, j].clone()
    old_coef = old_coef.clone()
    atom, coef = old_atom, old_coef
    sigma = coef.norm()
    for _ in range(power_steps):
        direction = residual @ coef + old_atom * (old_coef @ coef)
        norm = direction.norm()
        if norm == 0:
            break
        atom = direction / norm
        coef = (atom @ residual + (atom @ old_atom) * old_coef) * users
        previous, sigma = sigma, coef.norm()
        if (sigma - previous).abs() <= POWER_TOL * sigma:
            break
    residual.addr_(old_atom, old_coef).addr_(atom, coef, alpha=-1.0)
    dictionary[:, j] = atom
    codes[j] = coef
    return True


def _rarely_used(codes: torch.Tensor) -> list[int]:
    """Atoms used by fewer than RARE_USE × the average number of columns per atom."""
    users = (codes != 0).sum(dim=1).to(torch.float64)
    return (users < RARE_USE * users.mean()).nonzero().flatten().tolist()


def _duplicates(dictionary: torch.Tensor) -> list[int]:
    """Atoms nearly parallel (|cos| > DUPLICATE_COS) to an earlier atom: they waste a slot."""
    cos = (dictionary.T @ dictionary).abs().triu(diagonal=1)
    return (cos.max(dim=0).values > DUPLICATE_COS).nonzero().flatten().tolist()


def _reseed(dictionary: torch.Tensor, signals: torch.Tensor, residual: torch.Tensor, atoms: list[int]) -> int:
    """Replace ``atoms`` by the normalized signals that are worst approximated (largest residual)."""
    atoms = sorted(set(atoms))
    if not atoms:
        return 0
    worst = residual.norm(dim=0).argsort(descending=True)[: len(atoms)]
    for j, column in zip(atoms, worst.tolist()):
        vector = signals[:, column]
        norm = vector.norm()
        if norm > 0:
            dictionary[:, j] = vector / norm
    return len(atoms)


def sparsity_budget(d_in: int, d_out: int, ratio: float, rho: float, group: int,
                    index_cost: float) -> int:
    """Largest s with (ρ·s·d_in)/group + s·d_out·(1 + index_cost) ≤ (1 − ratio)·d_in·d_out.

    ``index_cost`` is the size of one stored index in units of one stored value (0 to leave the
    indices out of the budget); a dictionary shared by ``group`` modules is charged 1/group each.
    """
    budget = (1.0 - ratio) * d_in * d_out
    per_s = rho * d_in / group + d_out * (1.0 + index_cost)
    return max(1, math.floor(budget / per_s))


def orthogonal_dictionary(signals: torch.Tensor, n_atoms: int, sparsity: int, iterations: int,
                          tolerance: float = 0.0) -> KSVDResult:
    """Sparse coding over an orthonormal dictionary (DᵀD = I, k ≤ n), both steps in closed form
    (COMPOT's alternation, as reconstructed from the paper's abstract).

    With orthonormal atoms, ‖x − D·c‖² = ‖x‖² − ‖Dᵀx‖² + ‖Dᵀx − c‖², so the best s-sparse code of a
    column is its s largest projections (hard thresholding, exactly what OMP returns on such a D),
    and for fixed codes S the best orthonormal D is the orthogonal Procrustes solution U·Vᵀ of
    X·Sᵀ = U·Σ·Vᵀ. Each step minimizes the error exactly over its block, so the error never rises.
    Starts from the k leading left singular vectors of X; ``tolerance`` as in ``ksvd``.
    """
    n = signals.shape[0]
    if n_atoms > n:
        raise ValueError(f"an orthonormal dictionary has at most n = {n} atoms, asked for {n_atoms}")
    x = signals
    dictionary = torch.linalg.svd(x, full_matrices=False)[0][:, :n_atoms]
    energy = x.square().sum().clamp_min(torch.finfo(x.dtype).tiny)
    result = KSVDResult(dictionary, torch.empty(0), torch.empty(0))
    projections = dictionary.T @ x
    for iteration in range(iterations):
        indices = projections.abs().topk(sparsity, dim=0).indices
        codes = dense_codes(indices, projections.gather(0, indices), n_atoms)
        u, _, vh = torch.linalg.svd(x @ codes.T, full_matrices=False)
        dictionary = u @ vh
        projections = dictionary.T @ x
        result.indices = indices
        result.dictionary = dictionary
        result.values = projections.gather(0, indices)
        # orthonormal atoms, values = projections: ‖x − D_I·v‖² = ‖x‖² − ‖v‖²
        result.errors.append(((energy - result.values.square().sum()).clamp_min(0.0) / energy).sqrt().item())
        result.best = iteration
        if (tolerance > 0 and iteration and iteration + 1 < iterations
                and result.errors[-2] - result.errors[-1] <= tolerance * result.errors[-2]):
            result.stopped_early = True
            break
    return result
