"""k-reciprocal re-ranking in bounded memory (Zhong, Zheng, Cao, Li; CVPR 2017)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from reidkit.retrieval.metrics import distance_matrix

if TYPE_CHECKING:
    import torch

# Rows of the (N x N) all-images distance matrix handled at a time: the largest temporary is
# a few (chunk x N) float32 blocks, about 40 MB each for Market at 512.
DEFAULT_CHUNK = 512


class _Distances(Protocol):
    """Original distances between all N = queries + gallery images, queries first."""

    num_queries: int
    num_total: int

    def rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, N) float32; rows never straddle the query/gallery boundary."""

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """d(rows[k], cols[k]) as float32."""


class _DenseDistances:
    """Reads the three caller-owned blocks of [[q_q, q_g], [q_g.T, g_g]]; copies none."""

    def __init__(self, q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> None:
        self.q_g, self.q_q, self.g_g = np.asarray(q_g), np.asarray(q_q), np.asarray(g_g)
        nq, ng = self.q_g.shape
        if self.q_q.shape != (nq, nq) or self.g_g.shape != (ng, ng):
            raise ValueError(
                f"q_g_dist {self.q_g.shape} needs q_q_dist ({nq}, {nq}) and g_g_dist "
                f"({ng}, {ng}); got {self.q_q.shape} and {self.g_g.shape}"
            )
        self.num_queries = nq
        self.num_total = nq + ng

    def rows(self, start: int, stop: int) -> np.ndarray:
        nq = self.num_queries
        if stop <= nq:
            parts = (self.q_q[start:stop], self.q_g[start:stop])
        else:
            parts = (self.q_g[:, start - nq : stop - nq].T, self.g_g[start - nq : stop - nq])
        return np.concatenate(parts, axis=1, dtype=np.float32)

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        nq = self.num_queries
        out = np.empty(len(rows), dtype=np.float32)
        r_q, c_q = rows < nq, cols < nq
        for r_mask, c_mask, fetch in (
            (r_q, c_q, lambda r, c: self.q_q[r, c]),
            (r_q, ~c_q, lambda r, c: self.q_g[r, c - nq]),
            (~r_q, c_q, lambda r, c: self.q_g[c, r - nq]),
            (~r_q, ~c_q, lambda r, c: self.g_g[r - nq, c - nq]),
        ):
            sel = r_mask & c_mask
            out[sel] = fetch(rows[sel], cols[sel])
        return out


class _FeatureDistances:
    """Computes distance rows and pairs from features on demand; never holds N x N."""

    def __init__(self, q_feats: np.ndarray, g_feats: np.ndarray, metric: str) -> None:
        import torch

        if metric not in ("euclidean", "sqeuclidean", "cosine"):
            raise ValueError(
                f"unknown metric {metric!r}; choose one of euclidean, sqeuclidean, cosine"
            )
        self.q = torch.as_tensor(q_feats).float().cpu()
        self.g = torch.as_tensor(g_feats).float().cpu()
        if self.q.ndim != 2 or self.g.ndim != 2 or self.q.shape[1] != self.g.shape[1]:
            raise ValueError(
                f"features must be (N, D) with the same D; got {tuple(self.q.shape)} "
                f"and {tuple(self.g.shape)}"
            )
        self.metric = metric
        self.norms = torch.cat(
            [torch.linalg.vector_norm(self.q, dim=1), torch.linalg.vector_norm(self.g, dim=1)]
        ).numpy()
        self.num_queries = self.q.shape[0]
        self.num_total = self.q.shape[0] + self.g.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        nq = self.num_queries
        block = self.q[start:stop] if stop <= nq else self.g[start - nq : stop - nq]
        return np.concatenate(
            [
                distance_matrix(block, self.q, self.metric),
                distance_matrix(block, self.g, self.metric),
            ],
            axis=1,
        )

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        import torch

        nq = self.num_queries
        out = np.empty(len(rows), dtype=np.float32)
        step = 8192  # pairs per step: two (step x D) gathers
        for start in range(0, len(rows), step):
            r, c = rows[start : start + step], cols[start : start + step]
            dot = torch.empty(len(r))
            # One index_select per (query|gallery) x (query|gallery) group: no concatenation
            # of q and g, and no scatter of gathered rows.
            for r_side, c_side in ((True, True), (True, False), (False, True), (False, False)):
                sel = np.flatnonzero(((r < nq) == r_side) & ((c < nq) == c_side))
                if len(sel) == 0:
                    continue
                a = (self.q if r_side else self.g).index_select(
                    0, torch.from_numpy(r[sel] - (0 if r_side else nq))
                )
                b = (self.q if c_side else self.g).index_select(
                    0, torch.from_numpy(c[sel] - (0 if c_side else nq))
                )
                dot[torch.from_numpy(sel)] = torch.einsum("pd,pd->p", a, b)
            a_norm = torch.from_numpy(self.norms[r])
            b_norm = torch.from_numpy(self.norms[c])
            if self.metric == "cosine":
                d = 1.0 - dot / (a_norm * b_norm).clamp_min(1e-12)
            else:
                # The expansion distance_matrix uses, so pairs agree with the rows.
                d = (a_norm.square() + b_norm.square() - 2.0 * dot).clamp_min(0.0)
                if self.metric == "euclidean":
                    d = d.sqrt()
            out[start : start + step] = d.numpy()
        return out


def _smallest_k(block: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest entries of each row, ordered as a stable argsort orders them."""
    part = np.argpartition(block, k - 1, axis=1)[:, :k]  # (C, k), any order within
    kth = np.take_along_axis(block, part, axis=1).max(axis=1)
    # argpartition may pick any of several entries equal to the k-th value; a stable sort
    # keeps the lowest gallery indices, so redo the (rare) rows with ties at the boundary.
    n_within = np.count_nonzero(block <= kth[:, None], axis=1)
    for row in np.flatnonzero(n_within > k):
        index = np.flatnonzero(block[row] <= kth[row])
        part[row] = index[np.argsort(block[row, index], kind="stable")[:k]]
    values = np.take_along_axis(block, part, axis=1)
    order = np.lexsort((part, values), axis=1)  # by value, ties by index
    return np.take_along_axis(part, order, axis=1)


def _reciprocal_mask(neighbours: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(len(rows), k+1) mask: neighbour a of row i is k-reciprocal (i is in its top k+1)."""
    forward = neighbours[rows, : k + 1]  # (C, k+1)
    backward = neighbours[forward, : k + 1]  # (C, k+1, k+1)
    return (backward == rows[:, None, None]).any(axis=2)


def _segment_rows(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the CSR entries of `rows`, and for each the position in `rows` it came from."""
    counts = indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(len(rows)), counts)
    first = np.cumsum(counts) - counts
    positions = np.repeat(indptr[rows], counts) + np.arange(counts.sum()) - np.repeat(first, counts)
    return positions, owner


def _neighbour_pass(
    source: _Distances, top: int, lambda_value: float, chunk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the all-images rows: top neighbours, row scales, and lambda * d(q, g).

    As the authors' code does, distances are squared and divided by their row's maximum
    (their code divides by column maxima and transposes: the same for a symmetric matrix);
    this scale feeds the neighbour order, the Gaussian weights and the lambda term. Negative
    distances (rounding in 1 - cos) are clamped to 0 so that squaring cannot reorder them.
    """
    nq, n = source.num_queries, source.num_total
    row_max_sq = np.empty(n, dtype=np.float32)
    neighbours = np.empty((n, top), dtype=np.int64)
    final = np.empty((nq, n - nq), dtype=np.float32)
    bounds = [*range(0, nq, chunk), *range(nq, n, chunk), n]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        block = source.rows(start, stop)  # (C, N)
        if np.isnan(block).any():
            raise ValueError("distances contain NaN; re-ranking needs finite distances")
        np.maximum(block, 0.0, out=block)
        np.square(block, out=block)
        row_max_sq[start:stop] = np.maximum(block.max(axis=1), np.finfo(np.float32).tiny)
        block /= row_max_sq[start:stop, None]
        neighbours[start:stop] = _smallest_k(block, top)
        if start < nq:
            final[start:stop] = lambda_value * block[:, nq:]
    return neighbours, row_max_sq, final


def _expanded_sets(neighbours: np.ndarray, k1: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, indices) of each image's expanded k-reciprocal set R*(i, k1).

    R(i, k1) grows by R(c, k1/2) for each member c whose half-size set overlaps R(i, k1) in
    more than 2/3 of its own size (the authors' code: strict >, k1/2 rounded half to even).
    """
    n = len(neighbours)
    half = int(np.around(k1 / 2.0))
    half_mask = np.concatenate(
        [
            _reciprocal_mask(neighbours, np.arange(s, min(n, s + chunk)), half)
            for s in range(0, n, chunk)
        ]
    )  # (N, half+1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    parts = []
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        forward = neighbours[rows, : k1 + 1]  # (C, k1+1)
        recip = _reciprocal_mask(neighbours, rows, k1)  # (C, k1+1)
        r_set = np.where(recip, forward, -1)
        c_mask = half_mask[forward]  # (C, k1+1, half+1)
        c_set = np.where(c_mask, neighbours[forward, : half + 1], -2)  # -2 never matches
        overlap = (c_set[..., None] == r_set[:, None, None, :]).any(axis=3).sum(axis=2)
        expand = recip & (3 * overlap > 2 * c_mask.sum(axis=2))  # overlap > 2/3 |R(c, k1/2)|
        members = np.concatenate(
            [r_set, np.where(expand[..., None], c_set, -1).reshape(len(rows), -1)], axis=1
        )  # (C, (k1+1) * (half+2))
        members = np.sort(np.where(members < 0, n, members), axis=1)  # absent -> n, sorts last
        keep = members < n
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]  # the union: drop repeats
        indptr[rows + 1] = keep.sum(axis=1)
        parts.append(members[keep])  # row-major: each row's set, ascending
    np.cumsum(indptr, out=indptr)
    return indptr, np.concatenate(parts)


def _query_expansion(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    neighbours: np.ndarray,
    k2: int,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local query expansion: V_i <- mean of V over i's k2 nearest neighbours (i included)."""
    n = len(neighbours)
    qe_indptr = np.zeros(n + 1, dtype=np.int64)
    qe_indices, qe_data = [], []
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        positions, owner = _segment_rows(indptr, neighbours[rows, :k2].ravel())
        keys = (owner // k2) * n + indices[positions]  # (local row, column)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if len(keys) == 0:
            continue
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        qe_indptr[rows + 1] = np.bincount(keys[first] // n, minlength=len(rows))
        qe_indices.append(keys[first] % n)
        qe_data.append(np.add.reduceat(data[positions][order], first) / k2)
    np.cumsum(qe_indptr, out=qe_indptr)
    return qe_indptr, np.concatenate(qe_indices), np.concatenate(qe_data)


def _add_jaccard(
    final: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    weight: float,
    chunk: int,
) -> None:
    """final += weight * Jaccard distance between each query's and each gallery image's V.

    1 - sum(min) / sum(max); each V row sums to 1, so sum(max) = 2 - sum(min), and only
    columns that both rows hold add to sum(min): those come from an inverted index (the
    columns of V over gallery rows), as in the authors' code.
    """
    nq, ng = final.shape
    n = nq + ng
    rows_of = np.repeat(np.arange(n), np.diff(indptr))
    in_gallery = rows_of >= nq
    order = np.argsort(indices[in_gallery], kind="stable")
    col_rows = rows_of[in_gallery][order] - nq
    col_data = data[in_gallery][order]
    col_ptr = np.zeros(n + 1, dtype=np.int64)
    col_ptr[1:] = np.cumsum(np.bincount(indices[in_gallery], minlength=n))
    for start in range(0, nq, chunk):
        rows = np.arange(start, min(nq, start + chunk))
        q_pos, q_owner = _segment_rows(indptr, rows)
        g_pos, pair_owner = _segment_rows(col_ptr, indices[q_pos])
        mins = np.minimum(data[q_pos][pair_owner], col_data[g_pos])
        flat = q_owner[pair_owner] * ng + col_rows[g_pos]
        shared = np.bincount(flat, weights=mins, minlength=len(rows) * ng).reshape(len(rows), ng)
        final[rows] += (weight * (1.0 - shared / (2.0 - shared))).astype(np.float32)


def _rerank(source: _Distances, k1: int, k2: int, lambda_value: float, chunk: int) -> np.ndarray:
    n = source.num_total
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be at least 1, got k1={k1}, k2={k2}")
    if max(k1 + 1, k2) > n:
        raise ValueError(f"k1 + 1 = {k1 + 1} and k2 = {k2} must not exceed the {n} images")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    neighbours, row_max_sq, final = _neighbour_pass(source, max(k1 + 1, k2), lambda_value, chunk)
    indptr, indices = _expanded_sets(neighbours, k1, chunk)
    # Gaussian kernel weights over each expanded set, normalised to sum to 1 per row, from
    # the same float32 operations as the neighbour pass: a weight sees the ranked value.
    rows_of = np.repeat(np.arange(n), np.diff(indptr))
    scaled = np.square(np.maximum(source.pairs(rows_of, indices), np.float32(0.0)))
    data = np.exp(-(scaled / row_max_sq[rows_of]).astype(np.float64))
    data /= np.bincount(rows_of, weights=data, minlength=n)[rows_of]
    if k2 != 1:  # the authors' code skips the expansion for k2 = 1
        indptr, indices, data = _query_expansion(indptr, indices, data, neighbours, k2, chunk)
    _add_jaccard(final, indptr, indices, data, 1.0 - lambda_value, chunk)
    return final


def k_reciprocal_rerank(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """Re-ranked (num_queries, num_gallery) float32 distances, from three distance blocks.

    k-reciprocal encoding (Zhong et al., CVPR 2017) as the authors' released code computes it:
    distances of all N = queries + gallery images are squared and divided by their row
    maximum; R(i, k1) holds the top-(k1+1) neighbours j of i that have i in their own
    top-(k1+1) (stable order: ties go to the lower index, queries before gallery); R(i, k1)
    grows by R(c, round(k1/2)) for each member c whose set overlaps R(i, k1) in more than 2/3
    of its size; V_i puts exp(-d(i, j)) on that set, normalised; local query expansion
    replaces V_i by the mean V of i's k2 nearest neighbours (k2 = 1: no expansion); the
    Jaccard distance is 1 - sum(min(V_q, V_g)) / sum(max(V_q, V_g)), and the result is
    (1 - lambda_value) * Jaccard + lambda_value * (the scaled original distance).

    Memory: the three blocks are read in place, never assembled into the N x N matrix; the
    work holds (chunk_size x N) float32 rows, the top neighbours (N x k1) and V as sparse
    rows, plus the result. The caller's g_g block alone is a (gallery x gallery) matrix
    (1 GB in float32 for Market); `k_reciprocal_rerank_features` avoids it.
    """
    source = _DenseDistances(q_g_dist, q_q_dist, g_g_dist)
    return _rerank(source, k1, k2, lambda_value, chunk_size)


def k_reciprocal_rerank_features(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    metric: str = "euclidean",
    chunk_size: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """Re-ranked distances computed from features, without any N x N matrix in memory.

    Same algorithm as `k_reciprocal_rerank`; distance rows are computed `chunk_size` at a time
    with `distance_matrix(..., metric)` and the distances that the weights need are computed
    pairwise. The default euclidean metric, squared inside, matches the authors' feature-based
    code (cdist, then squared). The cost is one all-images distance product, (N x D) @ (D x N).
    """
    source = _FeatureDistances(q_feats, g_feats, metric)
    return _rerank(source, k1, k2, lambda_value, chunk_size)
