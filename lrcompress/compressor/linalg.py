"""Linear-algebra helpers shared by the compressors: ranks from ratios, whitening, errors.

Every decomposition runs in float64; callers cast the factors back to the model dtype.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

CHOLESKY_RETRIES = 4          # damping is raised ×10 this many times before the eigh fallback
DAMPING_GROWTH = 10.0


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank r with r·(m+n) ≤ (1−ratio)·m·n; ``ratio`` is the fraction of parameters removed."""
    m, n = out_features, in_features
    rank = math.floor((1.0 - ratio) * m * n / (m + n))
    return max(1, min(rank, m, n))


def target_rank(out_features: int, in_features: int, rank: int | None, ratio: float | None) -> int:
    """The rank a recipe asks for: ``rank`` capped at min(out, in), or the rank of ``ratio``."""
    if rank is not None:
        return min(rank, out_features, in_features)
    return rank_for_ratio(out_features, in_features, ratio or 0.0)


def low_rank_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def shrink_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """(1 − α)·G + α·Diag(G): shrink the Gram's correlations toward its diagonal.

    Why: a Gram from a few thousand calibration tokens overfits the correlations of its text; the
    directions it calls unused are then truncated, and other text that excites them breaks. Shrinking
    the off-diagonal toward zero (Ledoit & Wolf, 2004, "A well-conditioned estimator for large-
    dimensional covariance matrices", with the diagonal as the target) keeps each input channel's own
    scale — the activation outliers an identity damping would drown — while distrusting the estimated
    correlations. α = 0 returns G itself (the same tensor, so the default path is unchanged).
    """
    if shrinkage == 0.0:
        return gram
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    return (1.0 - shrinkage) * gram + shrinkage * torch.diag_embed(torch.diagonal(gram))


@dataclass
class Whitening:
    """A factor S with G ≈ S·Sᵀ and its inverse: ‖X·Eᵀ‖_F = ‖E·S‖_F for any E (when G = XᵀX)."""

    factor: torch.Tensor       # S, n×n float64
    inverse: torch.Tensor      # S⁻¹, n×n float64
    path: str                  # which numerical path produced it, for the per-module record


def whitening(gram: torch.Tensor, damping: float, module_name: str = "") -> Whitening:
    """Cholesky of G + λ·mean(diag G)·I; raise λ on failure, then fall back to a clamped eigh.

    The damping keeps the factor well conditioned when some input directions are (nearly) unused;
    the fallback handles Grams that are not positive definite at all. The path taken is returned
    and logged, never silent.
    """
    g = gram.to(torch.float64)
    n = g.shape[0]
    identity = torch.eye(n, dtype=torch.float64, device=g.device)
    scale = torch.diagonal(g).mean().item()
    if not math.isfinite(scale) or scale <= 0.0:
        log.warning("%s: empty or degenerate Gram (mean diag %.3g); whitening with the identity",
                    module_name, scale)
        return Whitening(identity, identity, "identity (empty Gram)")
    lam = damping
    for attempt in range(CHOLESKY_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(g + lam * scale * identity)
        if int(info) == 0 and torch.isfinite(factor).all():
            inverse = torch.linalg.solve_triangular(factor, identity, upper=False)
            path = f"cholesky(damping={lam:.0e})" if attempt == 0 else f"cholesky-raised(damping={lam:.0e})"
            if attempt:
                log.info("%s: Cholesky needed damping %.0e", module_name, lam)
            return Whitening(factor, inverse, path)
        lam *= DAMPING_GROWTH
    return _eigh_whitening(g, module_name)


@dataclass(frozen=True)
class GramMetric:
    """How a method regularizes the calibration Gram it fits in: shrinkage toward the diagonal, then
    damping (``shrink_gram``, ``whitening``). The budget's pre-pass whitens with the metric of the method
    it allocates for, so that the spectrum it ranks is the one the method truncates."""

    damping: float = 1e-4
    shrinkage: float = 0.0

    @classmethod
    def of(cls, config: object) -> "GramMetric":
        """From a compressor config (methods without these options get the defaults)."""
        return cls(float(getattr(config, "damping", cls.damping)), float(getattr(config, "shrinkage", cls.shrinkage)))

    def whiten(self, gram: torch.Tensor, module_name: str = "") -> Whitening:
        return whitening(shrink_gram(gram, self.shrinkage), self.damping, module_name)


def _eigh_whitening(g: torch.Tensor, module_name: str) -> Whitening:
    """S = Q·Λ^½ with eigenvalues clamped at λ_max·n·eps (so S is invertible)."""
    evals, evecs = torch.linalg.eigh((g + g.T) / 2)
    floor = max(evals.max().item(), 0.0) * g.shape[0] * torch.finfo(torch.float64).eps
    floor = floor if floor > 0 else torch.finfo(torch.float64).tiny
    clamped = int((evals < floor).sum())
    evals = evals.clamp_min(floor)
    log.warning("%s: Cholesky failed after raising damping; eigh fallback clamped %d of %d eigenvalues",
                module_name, clamped, g.shape[0])
    factor = evecs * evals.sqrt()
    inverse = (evecs / evals.sqrt()).T
    return Whitening(factor, inverse, f"eigh-clamped({clamped} clamped)")


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of a float64 matrix."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split U·diag(s)·Vᵀ into B = U·√s and A = √s·Vᵀ (balanced norms keep low precision safe)."""
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X(W−Ŵ)ᵀ‖_F / ‖XWᵀ‖_F computed from G = XᵀX: tr(E·G·Eᵀ) = ‖XEᵀ‖²."""
    w = weight.to(torch.float64)
    e = w - approx.to(torch.float64)
    g = gram.to(torch.float64)
    num = torch.einsum("ij,jk,ik->", e, g, e).clamp_min(0).item()
    den = torch.einsum("ij,jk,ik->", w, g, w).item()
    if den <= 0:
        return 0.0 if num == 0 else float("inf")
    return math.sqrt(num / den)


def matched_weight(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damping: float,
                   module_name: str = "") -> tuple[torch.Tensor, str]:
    """The output-matching target W* (float64) and the numerical path taken.

    ``gram`` = X̂ᵀX̂ (this run's inputs), ``cross`` = XᵀX̂ (X: the uncompressed model's inputs). W* is
    the ridge solution of min_W′ ‖X̂W′ᵀ − XWᵀ‖² + λs‖W′ − W‖², s = mean(diag X̂ᵀX̂):

        W* = W·(XᵀX̂ + λsI)·(X̂ᵀX̂ + λsI)⁻¹

    so that ‖X̂Ŵᵀ − XWᵀ‖² + λs‖Ŵ − W‖² = ‖(Ŵ − W*)·S‖² + const for S·Sᵀ = X̂ᵀX̂ + λsI: every method that
    minimises the whitened error in that (damped) metric minimises the matched error when given W*.
    The ridge pulls W* toward W (not toward 0) in input directions the calibration barely excites, and
    X̂ = X gives W* = W exactly. On a failed Cholesky λ is raised ×10 (``CHOLESKY_RETRIES`` times), then a
    least-squares solve is used; docs/output-matching.md derives it.
    """
    g = gram.to(torch.float64)
    c = cross.to(g)
    w = weight.to(g)
    n = g.shape[0]
    identity = torch.eye(n, dtype=torch.float64, device=g.device)
    scale = torch.diagonal(g).mean().item()
    if not math.isfinite(scale) or scale <= 0.0:
        log.warning("%s: empty or degenerate Gram (mean diag %.3g); output-matching target is W", module_name, scale)
        return w.clone(), "target=W (empty Gram)"
    lam = damping
    for attempt in range(CHOLESKY_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(g + lam * scale * identity)
        if int(info) == 0 and torch.isfinite(factor).all():
            rhs = (c.T + lam * scale * identity) @ w.T                 # (X̂ᵀX + λsI)·Wᵀ
            target = torch.cholesky_solve(rhs, factor).T
            if attempt:
                log.info("%s: output-matching solve needed damping %.0e", module_name, lam)
            return target, f"cholesky(damping={lam:.0e})"
        lam *= DAMPING_GROWTH
    log.warning("%s: output-matching Gram not positive definite after raising the damping; least squares",
                module_name)
    rhs = (c.T + damping * scale * identity) @ w.T
    target = torch.linalg.lstsq(g + damping * scale * identity, rhs).solution.T
    return target, "lstsq"


def matched_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                         reference_gram: torch.Tensor) -> float:
    """‖X̂Ŵᵀ − XWᵀ‖_F / ‖XWᵀ‖_F from X̂ᵀX̂ (``gram``), XᵀX̂ (``cross``) and XᵀX (``reference_gram``):
    tr(Ŵ·X̂ᵀX̂·Ŵᵀ) − 2·tr(Ŵ·X̂ᵀX·Wᵀ) + tr(W·XᵀX·Wᵀ) over tr(W·XᵀX·Wᵀ)."""
    w = weight.to(torch.float64)
    a = approx.to(w)
    g, c, r = (m.to(w) for m in (gram, cross, reference_gram))
    den = torch.einsum("ij,jk,ik->", w, r, w).item()
    num = (torch.einsum("ij,jk,ik->", a, g, a) - 2 * torch.einsum("ij,jk,ik->", a, c.T, w)).item() + den
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return math.sqrt(max(num, 0.0) / den)
