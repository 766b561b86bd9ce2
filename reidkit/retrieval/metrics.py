"""Re-ID ranking metrics: distance matrices, CMC, mAP (two AP conventions) and mINP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from reidkit.errors import DatasetError

if TYPE_CHECKING:
    import torch

APMode = Literal["torchreid", "official"]
AP_MODES: tuple[str, ...] = ("torchreid", "official")
METRICS: tuple[str, ...] = ("cosine", "euclidean", "sqeuclidean")

# Queries per chunk: the working set is one (chunk x gallery) boolean mask plus the candidate
# arrays, about 16 MB of mask for Market at 1024; larger chunks gain nothing measurable.
DEFAULT_CHUNK = 1024


@dataclass(frozen=True, eq=False)
class RankingMetrics:
    """CMC / mAP / mINP over the valid queries of one query-gallery evaluation.

    `cmc[k]` is the fraction of valid queries with a true match within the top k+1.
    `mAP` and `mINP` are fractions in [0, 1]; `ap_mode` says which AP convention made `mAP`.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int
    ap_mode: str

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based): `rank(1)` is Rank-1 accuracy."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank {k} is outside 1..{len(self.cmc)} (max_rank)")
        return float(self.cmc[k - 1])


class MatchRanks(NamedTuple):
    """The 1-based rank of every true match, after junk removal, grouped by query.

    `ranks[offsets[i]:offsets[i] + counts[i]]` are query i's true-match ranks, ascending;
    `counts[i] == 0` marks a query that the protocol skips.
    """

    ranks: np.ndarray  # (sum(counts),) int64
    counts: np.ndarray  # (num_queries,) int64
    offsets: np.ndarray  # (num_queries,) int64


# --------------------------------------------------------------------------------------------
# Distance matrix


def distance_matrix(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    metric: str = "cosine",
    *,
    chunk_size: int = 4096,
) -> np.ndarray:
    """Query-gallery distances as a float32 numpy array of shape (num_queries, num_gallery).

    `metric` is "cosine" (1 - cosine similarity; exact for any features, and simply
    `1 - q @ g.T` for L2-normalised ones), "euclidean", or "sqeuclidean" (squared euclidean,
    as torchreid's `euclidean_squared_distance`). Numpy arrays and torch tensors are accepted;
    tensors on a GPU are multiplied there and the result is copied back. The product runs
    in float32 through torch's BLAS with all of torch's threads, `chunk_size` queries at a
    time, written straight into the output, so the only large allocation is the result.
    """
    import torch

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    q = torch.as_tensor(q_feats).float()
    g = torch.as_tensor(g_feats).float()
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D; got {tuple(q.shape)} and {tuple(g.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    g = g.to(q.device)
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
    on_cpu = q.device.type == "cpu"
    out_t = torch.from_numpy(out) if on_cpu else None
    g_t = g.T
    if metric == "cosine":
        # Scaling the product by the inverse norms costs one pass over the output, instead of
        # writing normalised copies of the (much larger) feature matrices.
        g_inv = 1.0 / torch.linalg.vector_norm(g, dim=1).clamp_min(1e-12)
    else:
        g_sq = torch.linalg.vector_norm(g, dim=1).square()  # no (N x D) temporary
    for start in range(0, q.shape[0], chunk_size):
        q_chunk = q[start : start + chunk_size]
        if on_cpu:
            block = out_t[start : start + len(q_chunk)]
            torch.mm(q_chunk, g_t, out=block)
        else:
            block = q_chunk @ g_t
        if metric == "cosine":
            q_inv = 1.0 / torch.linalg.vector_norm(q_chunk, dim=1).clamp_min(1e-12)
            block.mul_(q_inv[:, None]).mul_(g_inv[None, :])
            block.neg_().add_(1.0)
        else:
            q_sq = torch.linalg.vector_norm(q_chunk, dim=1).square()
            # |q|^2 + |g|^2 - 2 q.g; rounding can take it a hair below zero for near-duplicates.
            block.mul_(-2.0).add_(q_sq[:, None]).add_(g_sq[None, :]).clamp_min_(0.0)
            if metric == "euclidean":
                block.sqrt_()
        if not on_cpu:
            out[start : start + len(q_chunk)] = block.cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Average precision on one ranked list


def _check_ap_mode(mode: str) -> None:
    if mode not in AP_MODES:
        raise ValueError(f"unknown ap_mode {mode!r}; choose one of {', '.join(AP_MODES)}")


def _ap_terms(ranks: np.ndarray, hit_index: np.ndarray, mode: str) -> np.ndarray:
    """Per-hit AP summands; hit `hit_index` (1-based, j) sits at 1-based rank `ranks` (r_j).

    torchreid: precision j / r_j. official (Market-1501 `compute_AP.m`): the trapezoid
    (old_precision + precision) / 2 with old_precision = (j - 1) / (r_j - 1), the precision one
    rank earlier, and 1 when r_j = 1 (the code's initial value). Each hit lifts recall by
    1 / num_hits, so both APs are the mean of these terms.
    """
    ranks = ranks.astype(np.float64)
    hit_index = hit_index.astype(np.float64)
    precision = hit_index / ranks
    if mode == "torchreid":
        return precision
    previous = np.where(ranks > 1, (hit_index - 1) / np.maximum(ranks - 1, 1), 1.0)
    return (previous + precision) / 2


def average_precision(hits: np.ndarray, mode: APMode = "torchreid") -> float:
    """AP of one ranked list given as a boolean hit vector (junk already removed).

    `mode="torchreid"`: the mean of precision at each hit (torchreid, fast-reid).
    `mode="official"`: the official Market-1501 code's trapezoid form, which averages the
    precision at each hit with the precision one rank before it (reads lower).
    A list without any hit has no AP: ValueError.
    """
    _check_ap_mode(mode)
    ranks = np.flatnonzero(np.asarray(hits, dtype=bool)) + 1
    if len(ranks) == 0:
        raise ValueError("average precision is undefined for a ranked list without a hit")
    return float(np.mean(_ap_terms(ranks, np.arange(1, len(ranks) + 1), mode)))


# --------------------------------------------------------------------------------------------
# Ranks of the true matches without sorting the gallery


def _same_pid_pairs(
    q_pids: np.ndarray, g_pids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query, gallery) index pairs with equal pids, query-major, gallery index ascending.

    Returns the pairs' query indices, gallery indices and the pair count of each query.
    """
    g_order = np.argsort(g_pids, kind="stable")  # stable: gallery index ascending within a pid
    g_sorted = g_pids[g_order]
    lo = np.searchsorted(g_sorted, q_pids, side="left")
    counts = np.searchsorted(g_sorted, q_pids, side="right") - lo
    q_index = np.repeat(np.arange(len(q_pids)), counts)
    first = np.cumsum(counts) - counts
    within = np.arange(counts.sum()) - np.repeat(first, counts)
    g_index = g_order[np.repeat(lo, counts) + within]
    return q_index, g_index, counts


def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint64 (low 32 bits) so integer order equals float order."""
    # +0.0 turns -0.0 into +0.0: the two compare equal as floats, so they must tie here too.
    bits = (values + np.float32(0.0)).view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    ordered = np.where(negative, ~bits, bits | np.uint32(0x80000000))
    return ordered.astype(np.uint64)


def _chunk_ranks_packed(
    block: np.ndarray,
    candidates: np.ndarray,
    m_rows: np.ndarray,
    m_cols: np.ndarray,
    m_dists: np.ndarray,
    col_bits: int,
) -> np.ndarray:
    """Ranks of the matches of a float32 block, via one sort of packed integer keys.

    Each candidate (row, distance, gallery index) packs into one uint64 whose integer order is
    (row, distance, gallery index) order, so a plain value sort (SIMD, no argsort) of the keys
    puts every row's candidates in ranked order with ties broken by gallery index.
    """
    num_gallery = block.shape[1]
    shift_row = np.uint64(32 + col_bits)
    shift_val = np.uint64(col_bits)
    flat = np.flatnonzero(candidates)
    keys = (flat // num_gallery).astype(np.uint64)  # built in place: the candidates can be many
    keys <<= shift_row
    keys |= _ordered_bits(block.ravel()[flat]) << shift_val
    keys |= (flat % num_gallery).astype(np.uint64)
    del flat
    keys.sort()
    m_keys = (
        (m_rows.astype(np.uint64) << shift_row)
        | (_ordered_bits(m_dists) << shift_val)
        | m_cols.astype(np.uint64)
    )
    m_keys.sort()  # (row, distance, index) order: each row's matches by ascending rank
    position = np.searchsorted(keys, m_keys)
    row_start = np.searchsorted(keys, (m_keys >> shift_row) << shift_row)
    return (position - row_start + 1).astype(np.int64)


def _chunk_ranks_lexsort(
    block: np.ndarray,
    candidates: np.ndarray,
    match_in_row: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the matches of a block of any float dtype, via a stable lexsort.

    `match_in_row` is a boolean block marking the true matches. Returns rows and ranks of the
    matches, in (row, rank) order.
    """
    num_gallery = block.shape[1]
    flat = np.flatnonzero(candidates)  # row-major: gallery index ascending within a row
    rows = flat // num_gallery
    order = np.lexsort((block.ravel()[flat], rows))  # stable: ties keep gallery order
    flat = flat[order]
    rows = rows[order]
    row_start = np.searchsorted(rows, rows, side="left")
    rank = np.arange(len(flat)) - row_start + 1
    is_match = match_in_row.ravel()[flat]
    return rows[is_match], rank[is_match]


def match_ranks(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> MatchRanks:
    """The 1-based rank of every true match of every query, as `cmc_map` defines ranks.

    Equal to ranking each row with a stable argsort, dropping same-pid same-camera entries and
    reading off where the true matches land, but without sorting the gallery: for each query
    only the valid entries no farther than its hardest true match matter, since

        rank(match) = #(valid entries with a smaller distance,
                        or an equal distance and a smaller gallery index) + 1,

    and those few are sorted. The cost therefore grows with how deep the hardest match lies
    (a strong model's last match is near the top); the worst case is a full sort, holding
    some 40 bytes per query-gallery pair of a chunk, so `chunk_size` bounds the memory.
    Works `chunk_size` queries at a time. NaN distances sort last (as numpy sorts them); a NaN
    distance to a true match is an error.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids, q_camids, g_camids = (
        np.asarray(a).astype(np.int64, copy=False).ravel()
        for a in (q_pids, g_pids, q_camids, g_camids)
    )
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(
            f"distmat has {num_q} query rows but q_pids/q_camids have "
            f"{len(q_pids)}/{len(q_camids)} entries"
        )
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"distmat has {num_g} gallery columns but g_pids/g_camids have "
            f"{len(g_pids)}/{len(g_camids)} entries"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not np.issubdtype(distmat.dtype, np.floating):
        distmat = distmat.astype(np.float64)
    # float16 widens to float32 exactly, so it takes the packed-key path too.
    packed = distmat.dtype in (np.float32, np.float16)
    col_bits = max(1, int(num_g - 1).bit_length())
    row_bits = 64 - 32 - col_bits  # what the packed key leaves for the row inside a chunk
    if packed and row_bits >= 1:
        chunk_size = min(chunk_size, 1 << row_bits)
    else:
        packed = False

    pair_q, pair_g, _ = _same_pid_pairs(q_pids, g_pids)
    pair_junk = g_camids[pair_g] == q_camids[pair_q]
    counts = np.bincount(pair_q[~pair_junk], minlength=num_q).astype(np.int64)
    # Pairs are query-major, so each chunk's pairs form one contiguous slice.
    pair_bounds = np.searchsorted(pair_q, np.arange(0, num_q + chunk_size, chunk_size))

    ranks = np.empty(int(counts.sum()), dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    for chunk, start in enumerate(range(0, num_q, chunk_size)):
        stop = min(num_q, start + chunk_size)
        block = np.ascontiguousarray(distmat[start:stop])
        if packed and block.dtype != np.float32:
            block = block.astype(np.float32)
        lo, hi = pair_bounds[chunk], pair_bounds[chunk + 1]
        rows = pair_q[lo:hi] - start
        cols = pair_g[lo:hi]
        junk = pair_junk[lo:hi]
        m_rows, m_cols = rows[~junk], cols[~junk]
        if len(m_rows) == 0:
            continue
        m_dists = block[m_rows, m_cols]
        if np.isnan(m_dists).any():
            raise ValueError("distmat has NaN distances between a query and its true match")
        # The hardest match bounds the entries that can precede any match; a NaN threshold
        # (no match) makes the comparison false for the whole row.
        threshold = np.full(stop - start, np.nan, dtype=block.dtype)
        row_first = np.flatnonzero(np.r_[True, m_rows[1:] != m_rows[:-1]])
        threshold[m_rows[row_first]] = np.maximum.reduceat(m_dists, row_first)
        candidates = block <= threshold[:, None]
        candidates[rows[junk], cols[junk]] = False
        if packed:
            chunk_ranks = _chunk_ranks_packed(block, candidates, m_rows, m_cols, m_dists, col_bits)
        else:
            match_in_row = np.zeros(block.shape, dtype=bool)
            match_in_row[m_rows, m_cols] = True
            _, chunk_ranks = _chunk_ranks_lexsort(block, candidates, match_in_row)
        # Both paths return ranks grouped by row in row order, so they fill the chunk's slice.
        first = offsets[start]
        ranks[first : first + len(chunk_ranks)] = chunk_ranks
    return MatchRanks(ranks=ranks, counts=counts, offsets=offsets)


# --------------------------------------------------------------------------------------------
# CMC / mAP / mINP


def metrics_from_ranks(
    match: MatchRanks, max_rank: int = 50, ap_mode: APMode = "torchreid"
) -> RankingMetrics:
    """CMC / mAP / mINP from the true-match ranks of each query (see `cmc_map`)."""
    _check_ap_mode(ap_mode)
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    counts = np.asarray(match.counts)
    valid = counts > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise DatasetError(
            "no query has a true match in the gallery (same pid, another camera); check that "
            "query and gallery come from the same dataset split"
        )
    v_counts = counts[valid]
    v_offsets = np.asarray(match.offsets)[valid]
    ranks = np.asarray(match.ranks)
    hit_index = np.arange(len(ranks)) - np.repeat(np.asarray(match.offsets), counts) + 1
    ap = np.add.reduceat(_ap_terms(ranks, hit_index, ap_mode), v_offsets) / v_counts
    first = ranks[v_offsets]
    last = ranks[v_offsets + v_counts - 1]
    inp = v_counts / last
    # First-hit histogram; everything beyond max_rank lands in one overflow bin.
    first_hist = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)
    cmc = np.cumsum(first_hist[:max_rank]) / num_valid
    cmc.setflags(write=False)
    return RankingMetrics(
        cmc=cmc,
        mAP=float(ap.mean()),
        mINP=float(inp.mean()),
        num_valid_queries=num_valid,
        num_skipped_queries=int(len(counts) - num_valid),
        ap_mode=ap_mode,
    )


def cmc_map(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    ap_mode: APMode = "torchreid",
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> RankingMetrics:
    """CMC, mAP and mINP under the single-query re-ID protocol (torchreid, fast-reid, BoT).

    For each query (row of `distmat`, smaller = more similar):

    1. Rank the gallery by ascending distance with a stable sort: equal distances keep
       gallery order (lower gallery index first).
    2. Drop gallery entries with the query's pid AND camera (the same person seen by the same
       camera is too easy). Entries of other pids are negatives, distractors (pid 0) included.
    3. True matches are the remaining entries with the query's pid. A query without any is
       skipped and counted in `num_skipped_queries`; if every query is skipped: DatasetError.
    4. CMC: the hit indicator made cumulative, cut at `max_rank` (a rank past the end of a
       short gallery repeats the last value), averaged over the valid queries.
    5. AP: `ap_mode="torchreid"` is the mean of precision at each hit, j / r_j for the j-th
       hit at rank r_j; `ap_mode="official"` is the official Market-1501 code's trapezoid
       form, the mean of (old_precision + precision) / 2 with old_precision = (j-1) / (r_j-1)
       (1 when r_j = 1). mAP is the mean AP of the valid queries.
    6. INP: number of true matches / rank of the hardest (last) one; mINP its mean, as
       fast-reid reports it.

    Ranks come from `match_ranks`, which never sorts the whole gallery and is exactly equal
    to the definition above; `chunk_size` queries are handled at a time.
    """
    _check_ap_mode(ap_mode)
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    match = match_ranks(distmat, q_pids, g_pids, q_camids, g_camids, chunk_size=chunk_size)
    return metrics_from_ranks(match, max_rank=max_rank, ap_mode=ap_mode)
