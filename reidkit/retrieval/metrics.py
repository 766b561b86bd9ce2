"""Re-ID ranking metrics: distance matrices, CMC, mAP (two AP conventions) and mINP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from reidkit.errors import DatasetError

if TYPE_CHECKING:
    import torch

APMode = Literal["torchreid", "official"]
AP_MODES: tuple[str, ...] = ("torchreid", "official")
METRICS: tuple[str, ...] = ("cosine", "euclidean", "sqeuclidean")

# Query-gallery entries ranked at a time when no chunk size is given: the working set is
# about 15 bytes an entry (a float32 block, its int64 histogram cells, two boolean masks),
# some 8 MB at 2^19 whatever the gallery size: 32 Market queries, 6 of MSMT17's. Small, so
# that the dozen numpy passes over a chunk run from the processor's cache instead of main
# memory: on Market-sized distances, strong, weak or evenly spread (every entry counted),
# chunks of 2^19 ranked 1.4-1.5x faster than chunks of 2^23 (bench/RESULTS.md).
CHUNK_ENTRIES = 1 << 19
# Query-gallery distances computed per product when ranking features: 128 MiB of float32.
# BLAS packs the whole gallery once per product, so thin products run below its speed: on
# the project's CPU, 2,048-d against MSMT17's gallery, 102 query rows ran at 82 GFLOP/s and
# 408 or more at 104-108. The product block is then ranked CHUNK_ENTRIES at a time.
PRODUCT_ENTRIES = 1 << 25
# Histogram cells per query between its nearest entry and its hardest true match (see
# `_histogram_shortlist`): enough that a cell holds a handful of a large gallery's entries.
HISTOGRAM_BINS = 4096
# The entries no farther than each query's hardest match are sorted directly while they are
# at most this share of a chunk (a strong model's distances); above it the histogram narrows
# them first. Sorting 5% of a chunk costs about one histogram pass over it (bench/RESULTS.md).
SHORTLIST_SHARE = 1 / 20


@dataclass(frozen=True, eq=False)
class RankingMetrics:
    """CMC / mAP / mINP of one query-gallery evaluation.

    `cmc[k]` is the fraction of queries with a true match within the top k+1. `mAP` and
    `mINP` are fractions in [0, 1]; `ap_mode` says which convention made them: "torchreid"
    averages over the valid queries (those with a true match), "official" over all queries,
    a query without a true match scoring 0, as the official Market-1501 code does.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int  # queries with at least one true match
    num_skipped_queries: int  # queries without one: skipped (torchreid) or scored 0 (official)
    ap_mode: str

    @property
    def num_averaged_queries(self) -> int:
        """The queries every average is over: the valid ones (torchreid) or all (official)."""
        if self.ap_mode == "official":
            return self.num_valid_queries + self.num_skipped_queries
        return self.num_valid_queries

    def rank(self, k: int) -> float:
        """CMC at rank k (1-based): `rank(1)` is Rank-1 accuracy."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank {k} is outside 1..{len(self.cmc)} (max_rank)")
        return float(self.cmc[k - 1])


class MatchRanks(NamedTuple):
    """The 1-based rank of every true match, after junk removal, grouped by query.

    `ranks[offsets[i]:offsets[i] + counts[i]]` are query i's true-match ranks, ascending;
    `counts[i] == 0` marks a query without a true match.
    """

    ranks: np.ndarray  # (sum(counts),) int64
    counts: np.ndarray  # (num_queries,) int64
    offsets: np.ndarray  # (num_queries,) int64


# --------------------------------------------------------------------------------------------
# Distance matrix


class _QueryBlocks:
    """Distances from chunks of queries to one gallery, multiplied on the features' device."""

    def __init__(
        self, q_feats: np.ndarray | torch.Tensor, g_feats: np.ndarray | torch.Tensor, metric: str
    ) -> None:
        import torch

        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        q = torch.as_tensor(q_feats).float()
        g = torch.as_tensor(g_feats).float()
        if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
            raise ValueError(
                f"features must be (N, D) with the same D; got {tuple(q.shape)} and "
                f"{tuple(g.shape)}"
            )
        self.q, self.g_t, self.metric = q, g.to(q.device).T, metric
        self.num_queries, self.num_gallery = q.shape[0], g.shape[0]
        if metric == "cosine":
            # Scaling the product by the inverse norms costs one pass over the output, instead
            # of writing normalised copies of the (much larger) feature matrices.
            self.g_term = 1.0 / torch.linalg.vector_norm(self.g_t, dim=0).clamp_min(1e-12)
        else:
            self.g_term = torch.linalg.vector_norm(self.g_t, dim=0).square()  # no (N x D) copy

    def block(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Distances of queries start..stop-1, written into `out` ((stop - start, gallery))."""
        import torch

        q_chunk = self.q[start:stop]
        on_cpu = q_chunk.device.type == "cpu"
        if on_cpu:
            block = torch.from_numpy(out)
            torch.mm(q_chunk, self.g_t, out=block)
        else:
            block = q_chunk @ self.g_t
        if self.metric == "cosine":
            q_inv = 1.0 / torch.linalg.vector_norm(q_chunk, dim=1).clamp_min(1e-12)
            block.mul_(q_inv[:, None]).mul_(self.g_term[None, :])
            block.neg_().add_(1.0)
        else:
            q_sq = torch.linalg.vector_norm(q_chunk, dim=1).square()
            # |q|^2 + |g|^2 - 2 q.g; rounding can take it a hair below zero for near-duplicates.
            block.mul_(-2.0).add_(q_sq[:, None]).add_(self.g_term[None, :]).clamp_min_(0.0)
            if self.metric == "euclidean":
                block.sqrt_()
        if not on_cpu:
            out[...] = block.cpu().numpy()
        return out


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
    `cmc_map_from_features` scores features without holding this matrix at all.
    """
    blocks = _QueryBlocks(q_feats, g_feats, metric)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out = np.empty((blocks.num_queries, blocks.num_gallery), dtype=np.float32)
    for start in range(0, blocks.num_queries, chunk_size):
        stop = min(blocks.num_queries, start + chunk_size)
        blocks.block(start, stop, out[start:stop])
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


class _ProtocolPairs(NamedTuple):
    """Every (query, gallery) pair with equal pids, query-major, gallery index ascending."""

    q_index: np.ndarray
    g_index: np.ndarray
    junk: np.ndarray  # same camera as well: removed from the query's ranking
    counts: np.ndarray  # true matches (pairs that are not junk) per query


def _protocol_pairs(
    q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray
) -> _ProtocolPairs:
    g_order = np.argsort(g_pids, kind="stable")  # stable: gallery index ascending within a pid
    g_sorted = g_pids[g_order]
    lo = np.searchsorted(g_sorted, q_pids, side="left")
    per_query = np.searchsorted(g_sorted, q_pids, side="right") - lo
    q_index = np.repeat(np.arange(len(q_pids)), per_query)
    first = np.cumsum(per_query) - per_query
    within = np.arange(per_query.sum()) - np.repeat(first, per_query)
    g_index = g_order[np.repeat(lo, per_query) + within]
    junk = g_camids[g_index] == q_camids[q_index]
    counts = np.bincount(q_index[~junk], minlength=len(q_pids)).astype(np.int64)
    return _ProtocolPairs(q_index, g_index, junk, counts)


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
    """Ranks of the matches among the candidates of a float32 block, via one sort of keys.

    Each candidate (row, distance, gallery index) packs into one uint64 whose integer order is
    (row, distance, gallery index) order, so a plain value sort (SIMD, no argsort) of the keys
    puts every row's candidates in ranked order with ties broken by gallery index. Returns
    1 + the number of candidates ahead of each match, in (row, distance, index) order.
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
) -> np.ndarray:
    """Ranks of the matches among the candidates of a block of any float dtype (lexsort).

    `match_in_row` is a boolean block marking the true matches. Returns 1 + the number of
    candidates ahead of each match, in (row, distance, index) order.
    """
    num_gallery = block.shape[1]
    flat = np.flatnonzero(candidates)  # row-major: gallery index ascending within a row
    rows = flat // num_gallery
    order = np.lexsort((block.ravel()[flat], rows))  # stable: ties keep gallery order
    flat = flat[order]
    rows = rows[order]
    row_start = np.searchsorted(rows, rows, side="left")
    rank = np.arange(len(flat)) - row_start + 1
    return rank[match_in_row.ravel()[flat]]


def _histogram_shortlist(
    block: np.ndarray,
    threshold: np.ndarray,
    candidates: np.ndarray,
    m_rows: np.ndarray,
    m_cols: np.ndarray,
    junk_rows: np.ndarray,
    junk_cols: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Narrow the candidates to the entries that share a histogram cell with a true match.

    Each query's range from its nearest entry to its hardest match (`threshold`) is cut into
    HISTOGRAM_BINS cells by a map of the distance that never decreases, so an entry in a lower
    cell than a match is nearer than it, and one in a higher cell farther. Entries in cells
    without a match are only counted; the entries in a match's own cell (a few of them) are
    what the exact sort still has to order. Everything past the hardest match, NaN and junk
    fall into one overflow cell past the others, which is never counted.

    Returns the narrowed candidates and, for each match in input order, the number of
    entries in lower cells that left the candidates (add it to the rank among the rest).
    """
    num_rows, num_gallery = block.shape
    bins = HISTOGRAM_BINS
    # float32 throughout: rounding never reverses an order, so the map stays monotone.
    low = np.fmin.reduce(block, axis=1).astype(np.float32)  # fmin: NaN entries ignored
    high = threshold.astype(np.float32)
    # Rows without a match, or with an infinite nearest entry or hardest match, keep all
    # their candidates (rare: the map needs a finite range).
    regular = np.isfinite(low) & np.isfinite(high)
    width = np.where(regular, high.astype(np.float64) - low, 0.0)
    scale = np.where(width > 0, (bins - 1) / np.where(width > 0, width, 1.0), 0.0)
    scale = scale.astype(np.float32)
    low = np.where(regular, low, np.float32(0.0))
    # cell = floor(d * scale - low * scale): 0 for the nearest entry, about bins - 1 for the
    # hardest match; fmin sends larger values, infinities and NaN (an infinity times a
    # zero scale) to the overflow cell `bins`.
    with np.errstate(invalid="ignore"):  # infinity times a zero scale: NaN, meant
        position = np.multiply(block, scale[:, None], dtype=np.float32)
        position -= (low * scale)[:, None]
    np.fmin(position, np.float32(bins), out=position)
    cells = position.astype(np.int64)  # truncation is floor: positions are >= 0
    del position
    cells += (np.arange(num_rows, dtype=np.int64) * (bins + 1))[:, None]
    cells[junk_rows, junk_cols] = junk_rows * (bins + 1) + bins
    counts = np.bincount(cells.ravel(), minlength=num_rows * (bins + 1))
    m_cells = cells[m_rows, m_cols]
    is_match_cell = np.zeros(num_rows * (bins + 1), dtype=bool)
    is_match_cell[m_cells] = True
    shortlist = is_match_cell[cells]
    del cells
    # Entries before each match's cell in its row, leaving out the match cells (their entries
    # stay in the shortlist and are ranked exactly): with those emptied, the running count up
    # to and including a match's cell is the count before it.
    counts[m_cells] = 0
    lower = np.cumsum(counts.reshape(num_rows, bins + 1), axis=1).ravel()[m_cells]
    irregular = np.flatnonzero(~regular)
    shortlist[irregular] = candidates[irregular]
    lower[~regular[m_rows]] = 0
    return shortlist, lower


def _block_ranks(
    block: np.ndarray, rows: np.ndarray, cols: np.ndarray, junk: np.ndarray, col_bits: int
) -> np.ndarray:
    """The ranks of the true matches of one block of query rows, grouped by row, ascending.

    `rows`, `cols` and `junk` are the block's same-pid pairs (row-major). For each query only
    the valid entries no farther than its hardest true match can precede a match, since

        rank(match) = #(valid entries with a smaller distance,
                        or an equal distance and a smaller gallery index) + 1,

    so only those candidates are sorted. When they are many (the hardest matches lie deep,
    as for a weak or cross-domain model), `_histogram_shortlist` counts most of them instead
    and leaves only the few that share a histogram cell with a match to sort: the cost then
    no longer grows with the depth of the hardest match.
    """
    m_rows, m_cols = rows[~junk], cols[~junk]
    if len(m_rows) == 0:
        return np.empty(0, dtype=np.int64)
    junk_rows, junk_cols = rows[junk], cols[junk]
    m_dists = block[m_rows, m_cols]
    if np.isnan(m_dists).any():
        raise ValueError("distmat has NaN distances between a query and its true match")
    # The hardest match bounds the entries that can precede any match; a NaN threshold
    # (no match) makes the comparison false for the whole row.
    threshold = np.full(block.shape[0], np.nan, dtype=block.dtype)
    row_first = np.flatnonzero(np.r_[True, m_rows[1:] != m_rows[:-1]])
    threshold[m_rows[row_first]] = np.maximum.reduceat(m_dists, row_first)
    candidates = block <= threshold[:, None]
    candidates[junk_rows, junk_cols] = False
    lower = None
    if np.count_nonzero(candidates) > SHORTLIST_SHARE * candidates.size:
        candidates, lower = _histogram_shortlist(
            block, threshold, candidates, m_rows, m_cols, junk_rows, junk_cols
        )
    if block.dtype == np.float32:
        ranks = _chunk_ranks_packed(block, candidates, m_rows, m_cols, m_dists, col_bits)
    else:
        match_in_row = np.zeros(block.shape, dtype=bool)
        match_in_row[m_rows, m_cols] = True
        ranks = _chunk_ranks_lexsort(block, candidates, match_in_row)
    if lower is not None:
        # Both sorts return ranks in (row, distance, gallery index) order of the matches.
        ranks += lower[np.lexsort((m_cols, m_dists, m_rows))]
    return ranks


def _checked_ids(
    num_q: int,
    num_g: int,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    what: str,
) -> tuple[np.ndarray, ...]:
    q_pids, g_pids, q_camids, g_camids = (
        np.asarray(a).astype(np.int64, copy=False).ravel()
        for a in (q_pids, g_pids, q_camids, g_camids)
    )
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(
            f"{what} has {num_q} queries but q_pids/q_camids have "
            f"{len(q_pids)}/{len(q_camids)} entries"
        )
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"{what} has {num_g} gallery entries but g_pids/g_camids have "
            f"{len(g_pids)}/{len(g_camids)} entries"
        )
    return q_pids, g_pids, q_camids, g_camids


def _rank_in_chunks(
    blocks: Callable[[int, int], np.ndarray],
    num_q: int,
    num_g: int,
    ids: tuple[np.ndarray, ...],
    chunk_size: int | None,
    progress: bool = False,
) -> MatchRanks:
    """MatchRanks from `blocks(start, stop)`, the distances of queries start..stop-1."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ENTRIES // max(1, num_g))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    col_bits = max(1, int(num_g - 1).bit_length())
    # The packed keys of a float32 block leave 64 - 32 - col_bits bits for the row.
    chunk_size = min(chunk_size, 1 << max(0, 32 - col_bits))
    pairs = _protocol_pairs(*ids)
    # Pairs are query-major, so each chunk's pairs form one contiguous slice.
    pair_bounds = np.searchsorted(pairs.q_index, np.arange(0, num_q + chunk_size, chunk_size))
    ranks = np.empty(int(pairs.counts.sum()), dtype=np.int64)
    offsets = np.cumsum(pairs.counts) - pairs.counts
    starts = range(0, num_q, chunk_size)
    if progress:
        import rich.progress
        from rich.console import Console

        from reidkit.terminal import draws_bars

        console = Console(stderr=True)
        if draws_bars(progress, console):
            starts = rich.progress.track(
                starts, description="ranking", transient=True, console=console
            )
    for chunk, start in enumerate(starts):
        stop = min(num_q, start + chunk_size)
        lo, hi = pair_bounds[chunk], pair_bounds[chunk + 1]
        if not (~pairs.junk[lo:hi]).any():
            continue  # no true match in this chunk: its distances are not needed
        chunk_ranks = _block_ranks(
            blocks(start, stop),
            pairs.q_index[lo:hi] - start,
            pairs.g_index[lo:hi],
            pairs.junk[lo:hi],
            col_bits,
        )
        # Ranks come grouped by row in row order, so they fill the chunk's slice.
        first = offsets[start]
        ranks[first : first + len(chunk_ranks)] = chunk_ranks
    return MatchRanks(ranks=ranks, counts=pairs.counts, offsets=offsets)


def match_ranks(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    *,
    chunk_size: int | None = None,
) -> MatchRanks:
    """The 1-based rank of every true match of every query, as `cmc_map` defines ranks.

    Equal to ranking each row with a stable argsort, dropping same-pid same-camera entries and
    reading off where the true matches land, but without sorting the gallery (see
    `_block_ranks`): the entries beyond each query's hardest match are never ordered, and
    when the hardest matches lie deep most entries before them are only counted. Works
    `chunk_size` queries at a time (default: CHUNK_ENTRIES query-gallery entries), which
    bounds the working memory. NaN distances sort last (as numpy sorts them); a NaN distance
    to a true match is an error.
    """
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    ids = _checked_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids, "distmat")
    # float16 widens to float32 exactly, so it takes the packed-key path too.
    dtype = distmat.dtype
    if not np.issubdtype(dtype, np.floating):
        dtype = np.float64
    elif dtype == np.float16:
        dtype = np.float32

    def blocks(start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(distmat[start:stop], dtype=dtype)

    return _rank_in_chunks(blocks, num_q, num_g, ids, chunk_size)


def feature_match_ranks(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    *,
    metric: str = "cosine",
    chunk_size: int | None = None,
    progress: bool = False,
) -> MatchRanks:
    """`match_ranks` of the distances between two feature sets, never holding all of them.

    The distances of PRODUCT_ENTRIES query-gallery pairs (about 128 MiB) at a time are
    computed as `distance_matrix(..., metric)` computes them and ranked `chunk_size` queries
    at a time (default: CHUNK_ENTRIES entries), then dropped before the next, so memory
    beyond the features is bounded (some 250 MB at any size) instead of growing with queries
    x gallery: MSMT17's 11,659 x 82,161 distances would be 3.8 GB in float32. `progress`
    shows a bar over the chunks.
    """
    source = _QueryBlocks(q_feats, g_feats, metric)
    num_q, num_g = source.num_queries, source.num_gallery
    ids = _checked_ids(num_q, num_g, q_pids, g_pids, q_camids, g_camids, "the features")
    product_rows = max(1, PRODUCT_ENTRIES // max(1, num_g))
    computed = (0, 0, np.empty((0, num_g), dtype=np.float32))  # (first row, end, distances)

    def blocks(start: int, stop: int) -> np.ndarray:
        # Chunks come in ascending order, so one product serves the chunks it covers.
        nonlocal computed
        first, end, distances = computed
        if not (first <= start and stop <= end):
            end = min(num_q, start + max(product_rows, stop - start))
            if distances.shape[0] < end - start:
                distances = np.empty((end - start, num_g), dtype=np.float32)
            computed = first, end, distances = start, end, distances[: end - start]
            source.block(start, end, distances)
        return distances[start - first : stop - first]

    return _rank_in_chunks(blocks, num_q, num_g, ids, chunk_size, progress)


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
    # The official Market-1501 code averages over every query, one without a true match
    # scoring 0 in the CMC, AP (and here INP); torchreid and fast-reid skip such queries.
    averaged = len(counts) if ap_mode == "official" else num_valid
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
    cmc = np.cumsum(first_hist[:max_rank]) / averaged
    cmc.setflags(write=False)
    return RankingMetrics(
        cmc=cmc,
        mAP=float(ap.sum() / averaged),
        mINP=float(inp.sum() / averaged),
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
    chunk_size: int | None = None,
) -> RankingMetrics:
    """CMC, mAP and mINP under the single-query re-ID protocol (torchreid, fast-reid, BoT).

    For each query (row of `distmat`, smaller = more similar):

    1. Rank the gallery by ascending distance with a stable sort: equal distances keep
       gallery order (lower gallery index first).
    2. Drop gallery entries with the query's pid AND camera (the same person seen by the same
       camera is too easy). Entries of other pids are negatives, distractors (pid 0) included.
    3. True matches are the remaining entries with the query's pid. A query without any is
       counted in `num_skipped_queries`; if every query lacks one: DatasetError.
    4. CMC: the hit indicator made cumulative, cut at `max_rank` (a rank past the end of a
       short gallery repeats the last value).
    5. AP: `ap_mode="torchreid"` is the mean of precision at each hit, j / r_j for the j-th
       hit at rank r_j; `ap_mode="official"` is the official Market-1501 code's trapezoid
       form, the mean of (old_precision + precision) / 2 with old_precision = (j-1) / (r_j-1)
       (1 when r_j = 1).
    6. INP: number of true matches / rank of the hardest (last) one, as fast-reid reports it.
    7. Averages: "torchreid" averages CMC, AP and INP over the queries with a true match,
       skipping the others (torchreid, fast-reid); "official" averages over all queries, a
       query without a true match scoring 0 in each (the official Market-1501 code divides
       its CMC and mAP by the number of queries).

    Ranks come from `match_ranks`, which never sorts the whole gallery and is exactly equal
    to the definition above; `chunk_size` queries are handled at a time.
    """
    _check_ap_mode(ap_mode)
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    match = match_ranks(distmat, q_pids, g_pids, q_camids, g_camids, chunk_size=chunk_size)
    return metrics_from_ranks(match, max_rank=max_rank, ap_mode=ap_mode)


def cmc_map_from_features(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    ap_mode: APMode = "torchreid",
    *,
    metric: str = "cosine",
    chunk_size: int | None = None,
    progress: bool = False,
) -> RankingMetrics:
    """`cmc_map` of `distance_matrix(q_feats, g_feats, metric)`, computed a chunk at a time.

    The same numbers as the two calls in turn, with memory beyond the features bounded by one
    chunk of queries (see `feature_match_ranks`) instead of the whole queries x gallery matrix.
    """
    _check_ap_mode(ap_mode)
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    match = feature_match_ranks(
        q_feats,
        g_feats,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        metric=metric,
        chunk_size=chunk_size,
        progress=progress,
    )
    return metrics_from_ranks(match, max_rank=max_rank, ap_mode=ap_mode)


def chance_rank1(
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    ap_mode: APMode = "torchreid",
) -> float:
    """Expected rank-1 of a random ranking under the protocol of `cmc_map`, for scale.

    Per query: its true matches / the gallery entries the protocol keeps (all but those with
    the query's pid and camera). Averaged as `cmc_map` averages CMC: over the queries with a
    true match ("torchreid"), or over all queries, one without a match scoring 0 ("official").
    Counted per pid and per (pid, camera), so it costs O(queries + gallery).
    """
    _check_ap_mode(ap_mode)
    by_pid: dict[int, int] = {}
    by_pid_camera: dict[tuple[int, int], int] = {}
    for pid, camid in zip(g_pids.tolist(), g_camids.tolist(), strict=True):
        by_pid[pid] = by_pid.get(pid, 0) + 1
        by_pid_camera[pid, camid] = by_pid_camera.get((pid, camid), 0) + 1
    rates = []
    for pid, camid in zip(q_pids.tolist(), q_camids.tolist(), strict=True):
        removed = by_pid_camera.get((pid, camid), 0)
        matches = by_pid.get(pid, 0) - removed
        if matches:
            rates.append(matches / (len(g_pids) - removed))
        elif ap_mode == "official":
            rates.append(0.0)
    return float(np.mean(rates)) if rates else 0.0
