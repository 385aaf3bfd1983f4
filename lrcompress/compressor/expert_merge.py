"""Expert clustering and merging: the tensor algorithms behind ``submoe`` and its baselines.

Everything here is pure float64 tensor code (no modules, no I/O), so it is tested on its own.
"""
from __future__ import annotations

import torch

from .linalg import Whitening

KMEANS_ITERATIONS = 100


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (seeded); returns a label per row, clusters never empty.

    Labels are renumbered in order of each cluster's smallest member, so equal partitions give equal
    labels whatever the seed. An emptied cluster is re-seeded with the point farthest from its centroid.
    """
    x = points.to(torch.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} points")
    g = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(dim=1).values.pow(2)
        if float(d2.sum()) <= 0.0:       # fewer distinct points than clusters: any unused point
            used = {int(torch.cdist(c[None], x).argmin()) for c in centers}
            choice = next(i for i in range(n) if i not in used)
        else:
            choice = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
        centers.append(x[choice])
    c = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(x, c)
        new = distances.argmin(dim=1)
        for cluster in range(k):
            if not (new == cluster).any():
                own = distances.gather(1, new[:, None]).squeeze(1)
                donors = torch.bincount(new, minlength=k)[new] > 1
                far = int(torch.where(donors, own, torch.full_like(own, -1.0)).argmax())
                new[far] = cluster
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == cluster].mean(dim=0) for cluster in range(k)])
    return canonical_labels(labels)


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters by first appearance (0 for the cluster holding item 0, ...)."""
    mapping: dict[int, int] = {}
    for value in labels.tolist():
        mapping.setdefault(value, len(mapping))
    return torch.tensor([mapping[v] for v in labels.tolist()], dtype=torch.long)


def cluster_experts(similarity: torch.Tensor, clusters: int, seed: int) -> list[list[int]]:
    """Group experts by the similarity of their outputs: K-means on the rows of the E × E mean-cosine
    matrix (expert i is described by how it relates to every expert; two experts whose outputs agree
    have near-equal rows). Returns the member lists, ordered by their first member."""
    labels = kmeans(similarity, clusters, seed)
    return [torch.nonzero(labels == c).flatten().tolist() for c in range(clusters)]


def hierarchical_clusters(similarity: torch.Tensor, clusters: int) -> list[list[int]]:
    """HC-SMoE-style grouping (Chen et al., arXiv 2410.08589): agglomerative clustering with average
    linkage on the output distance 1 − s_ij (s: the mean cosine of the experts' outputs), merging the
    closest pair of groups until ``clusters`` remain; deterministic (ties: lower indices first).
    Returns the member lists, ordered by their first member."""
    s = similarity.to(torch.float64)
    distance = 1.0 - (s + s.T) / 2
    groups: list[list[int]] = [[i] for i in range(len(s))]
    if not 1 <= clusters <= len(groups):
        raise ValueError(f"cannot make {clusters} clusters of {len(groups)} experts")
    while len(groups) > clusters:
        best: tuple[float, int, int] | None = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                linkage = float(distance[groups[a]][:, groups[b]].mean())
                if best is None or linkage < best[0] - 1e-15:
                    best = (linkage, a, b)
        assert best is not None
        _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups, key=lambda g: g[0])


def merge_weights(frequencies: torch.Tensor, members: list[int]) -> torch.Tensor:
    """w_i = f_i / Σ f_j over the cluster; uniform when no member was ever routed to."""
    f = frequencies[members].to(torch.float64)
    total = float(f.sum())
    return f / total if total > 0 else torch.full_like(f, 1.0 / len(members))


def union_svd_merge(weights: torch.Tensor, w: torch.Tensor, rank: int | None = None,
                    energy: float | None = None) -> torch.Tensor:
    """Sub-MoE's subspace merge of n experts' weights (n × out × in, one weight type).

    [W_1, …, W_n] (out × n·in) = U Σ [V_1ᵀ, …, V_nᵀ]; U Σ is shared, the per-expert blocks V_i are
    merged as V = Σ w_i V_i, and the merged weight is U Σ Vᵀ, truncated to ``rank`` singular triplets
    or to the fewest that keep the fraction ``energy`` of Σσ² (see ``energy_rank``). Without
    truncation this equals Σ w_i W_i exactly (U Σ V_iᵀ = W_i and the merge is linear); the shared
    subspace makes a difference only once truncated: the merged weight is then the average projected
    onto the union's dominant output directions, U_r U_rᵀ Σ w_i W_i.
    """
    u, s, merged_vt = union_svd_factors(weights, w, rank, energy=energy)
    return (u * s) @ merged_vt


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares keep the fraction ``energy`` of Σσ² (≥ 1)."""
    squares = s.to(torch.float64).pow(2)
    total = float(squares.sum())
    if total <= 0.0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1, len(s))


def spectrum_shares(weights: torch.Tensor) -> torch.Tensor:
    """Mean over the n experts of σ_k(W_i)² / ‖W_i‖²_F (n × out × in → min(out, in) values, descending,
    float64, summing to 1 unless every W_i is 0): the share of an expert's energy its k-th direction holds,
    for a typical expert. A cluster of like experts (what the clustering forms) has a union spectrum close
    to its members' own, so this is what truncating a merged cluster of this block to rank k keeps."""
    w = weights.to(torch.float64)
    squares = torch.linalg.svdvals(w).pow(2)                                  # n × min(out, in)
    totals = squares.sum(dim=1, keepdim=True)
    return torch.where(totals > 0, squares / totals.clamp_min(1e-300), torch.zeros_like(squares)).mean(0)


def allocate_ranks(values: list[torch.Tensor], budget: int, floors: list[int], ceilings: list[int]) -> list[int]:
    """Ranks r_u (floor_u ≤ r_u ≤ ceiling_u, Σ r_u = ``budget`` exactly) maximizing Σ_u Σ_{k<r_u} values_u[k].

    ``values[u][k]`` is what the (k+1)-th kept triplet of unit u is worth (e.g. its share of the unit's
    Σσ²); they must be non-increasing in k, as normalized σ² are, so every unit's best use of any rank is
    a prefix and the greedy choice (the budget's remaining triplets go to the largest values over all
    units) is optimal. Ties go to the earlier unit, then the lower k (deterministic)."""
    if not len(values) == len(floors) == len(ceilings):
        raise ValueError("values, floors and ceilings need one entry per unit")
    for v, lo, hi in zip(values, floors, ceilings):
        if not 0 <= lo <= hi <= len(v):
            raise ValueError(f"bounds {lo}..{hi} do not fit a unit of {len(v)} triplets")
        if len(v) > 1 and bool((v[1:hi] > v[:hi - 1] + 1e-12).any()):
            raise ValueError("a unit's values must be non-increasing (sorted spectra)")
    if not sum(floors) <= budget <= sum(ceilings):
        raise ValueError(f"a budget of {budget} triplets is outside [{sum(floors)}, {sum(ceilings)}], the sum "
                         "of the units' floors and ceilings")
    candidates = [(-float(v[k]), unit, k) for unit, (v, lo, hi) in enumerate(zip(values, floors, ceilings))
                  for k in range(lo, hi)]
    candidates.sort()
    ranks = list(floors)
    for _, unit, _ in candidates[:budget - sum(floors)]:
        ranks[unit] += 1
    return ranks


def regmean_merge(weights: torch.Tensor, grams: torch.Tensor, damping: float,
                  prior: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """RegMean (Jin et al., arXiv 2212.09849) for one linear map of n members: the W minimizing
    Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²_F, i.e. W = (Σ W_i G_i)(Σ G_i)⁻¹ with G_i = X_iᵀX_i (here each member's
    routed-token Gram, tokens weighted by their gate weight).

    Σ G_i is damped by λ·mean(diag Σ G_i)·I (λ = ``damping``; the paper instead shrinks the
    off-diagonal entries by α: both keep directions no token excites from being set by round-off; a
    ridge keeps the solve well posed whatever the token count). Solved in float64 (Cholesky, LU when
    the damped matrix is not numerically positive definite). The ridge pulls the directions no token
    excites towards ``prior`` (e.g. the frequency-weighted average; default 0, the plain ridge):
    W = (Σ W_i G_i + λ'·prior)(Σ G_i + λ'·I)⁻¹. Returns (merged out × in, the absolute damping λ'
    added). With one member and damping 0 it returns W_1; with equal Grams, the plain mean.
    """
    w = weights.to(torch.float64)
    g = grams.to(torch.float64)
    total = g.sum(0)
    rhs = torch.einsum("noi,nij->oj", w, g)                      # Σ W_i G_i  (out × in)
    added = damping * float(total.diagonal().mean())
    a = total + added * torch.eye(total.shape[0], dtype=total.dtype)
    if prior is not None:
        rhs = rhs + added * prior.to(rhs)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        merged = torch.cholesky_solve(rhs.T, factor).T
    else:
        merged = torch.linalg.solve(a, rhs.T).T                   # A is symmetric: (A⁻¹ Bᵀ)ᵀ = B A⁻¹
    return merged, added


def union_svd_factors(weights: torch.Tensor, w: torch.Tensor, rank: int | None = None,
                      whitenings: list[Whitening] | None = None, energy: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The union SVD merge as factors (U_r: out × r, Σ_r: r, merged Vᵀ: r × in), optionally whitened;
    the merged weight is U_r Σ_r Vᵀ.

    Sub-MoE† whitens each member by its routed-token Gram G_i = X_iᵀX_i = S_i S_iᵀ before the SVD:
    [W_1 S_1, …, W_n S_n] = U Σ [Ṽ_1ᵀ, …, Ṽ_nᵀ]. Truncating it to rank r minimizes
    Σ_i ‖X_i (W_i − U_r U_rᵀ W_i)ᵀ‖_F² over the shared output subspace U_r: the error every member makes
    on the tokens actually routed to it. Because the G_i are sums over tokens (not means), a member that
    gets more tokens pulls U_r harder; that is the cluster's Gram entering, as Σ_i of the members' own
    whitened errors, instead of one pooled Gram for all members (members see different tokens).

    The V blocks are merged *after un-whitening* (V_iᵀ = Ṽ_iᵀ S_i⁻¹, then V = Σ w_i V_i): each V_iᵀ is
    then in the input coordinates where U_r Σ_r V_iᵀ ≈ W_i, so the blocks are comparable and the merge is
    the same frequency-weighted merge as the unwhitened path; at full rank it is exactly Σ w_i W_i. Merging
    the whitened Ṽ_i instead would need one un-whitening for the merged expert (by the pooled Gram's
    factor S_c), which at full rank gives Σ w_i W_i S_i S_c⁻¹ ≠ Σ w_i W_i unless all S_i are equal.
    """
    n, out, inp = weights.shape
    blocks = weights.to(torch.float64)
    if whitenings is not None:
        blocks = torch.stack([b @ white.factor.to(b) for b, white in zip(blocks, whitenings)])
    concat = blocks.permute(1, 0, 2).reshape(out, n * inp)
    u, s, vh = torch.linalg.svd(concat, full_matrices=False)
    if energy is not None:
        rank = energy_rank(s, energy) if rank is None else min(rank, energy_rank(s, energy))
    if rank is not None:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    v_blocks = vh.reshape(len(s), n, inp)                     # v_blocks[:, i] = V_iᵀ (whitened: Ṽ_iᵀ)
    if whitenings is not None:
        v_blocks = torch.stack([v_blocks[:, i] @ white.inverse.to(blocks) for i, white in enumerate(whitenings)],
                               dim=1)
    merged_vt = torch.einsum("i,rin->rn", w.to(blocks), v_blocks)     # w lives on the CPU, the weights need not
    return u, s, merged_vt


def average_merge(weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """M-SMoE-style frequency-weighted average Σ w_i W_i (n × out × in → out × in)."""
    return torch.einsum("i,ioj->oj", w.to(weights.device, torch.float64), weights.to(torch.float64))


def merge_rows(rows: torch.Tensor, clusters: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor:
    """Router rows (or any per-expert tensor) of the merged experts: Σ w_i r_i over each cluster."""
    r = rows.to(torch.float64)
    return torch.stack([torch.einsum("i,i...->...", w.to(r), r[members]) for members, w in zip(clusters, weights)])


def most_frequent(frequencies: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` most routed-to experts, in their original order (ties: lower index)."""
    order = sorted(range(len(frequencies)), key=lambda i: (-float(frequencies[i]), i))
    return sorted(order[:keep])
