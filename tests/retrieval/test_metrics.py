"""CMC / mAP / mINP: hand-worked cases for each protocol rule, and a naive per-query reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reidkit.errors import DatasetError
from reidkit.retrieval import metrics
from reidkit.retrieval.metrics import (
    average_precision,
    cmc_map,
    cmc_map_from_features,
    distance_matrix,
    match_ranks,
)

# --------------------------------------------------------------------------------------------
# The naive reference: a full stable argsort per query, straight from the definitions.


def naive_cmc_map(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, ap_mode="torchreid"):
    cmcs, aps, inps, skipped = [], [], [], 0
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        hits = (g_pids[order] == q_pids[i])[~junk]
        if not hits.any():
            skipped += 1
            if ap_mode == "official":  # the official code scores it 0 in CMC, AP (and INP)
                cmcs.append(np.zeros(max_rank, dtype=bool))
                aps.append(0.0)
                inps.append(0.0)
            continue
        cmc = np.cumsum(hits) >= 1
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - len(cmc)), cmc[-1])])[:max_rank]
        cmcs.append(cmc)
        num_hits = hits.sum()
        if ap_mode == "torchreid":
            precisions = [hits[: n + 1].sum() / (n + 1) for n in range(len(hits)) if hits[n]]
            aps.append(np.mean(precisions))
        else:
            # The loop of the official Market-1501 compute_AP.m, junk already removed.
            ap, old_recall, old_precision, found = 0.0, 0.0, 1.0, 0
            for n in range(len(hits)):
                found += int(hits[n])
                recall, precision = found / num_hits, found / (n + 1)
                ap += (recall - old_recall) * (old_precision + precision) / 2
                old_recall, old_precision = recall, precision
                if found == num_hits:
                    break
            aps.append(ap)
        last = np.flatnonzero(hits)[-1] + 1
        inps.append(num_hits / last)
    valid = distmat.shape[0] - skipped
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), valid, skipped


def random_problem(rng, num_q, num_g, num_ids, num_cams, levels=None, dtype=np.float32):
    q_pids = rng.integers(1, num_ids + 1, num_q)
    g_pids = rng.integers(0, num_ids + 1, num_g)  # pid 0: distractors
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    distmat = rng.standard_normal((num_q, num_g))
    if levels is not None:  # few distinct values: many ties
        distmat = rng.integers(0, levels, (num_q, num_g)) / levels - 0.5
    # Pull true matches closer so the metrics are not all near zero.
    distmat -= 0.8 * (q_pids[:, None] == g_pids[None, :])
    return distmat.astype(dtype), q_pids, g_pids, q_camids, g_camids


# --------------------------------------------------------------------------------------------
# average_precision, by hand


def test_ap_counts_only_hits():
    # hits at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert average_precision(np.array([True, False, True])) == pytest.approx(5 / 6)


def test_official_ap_averages_adjacent_precisions():
    # hit 1 at rank 1: (old 1 + 1/1) / 2 = 1; hit 2 at rank 3: (old 1/2 + 2/3) / 2 = 7/12
    # AP = (1 + 7/12) / 2 = 19/24
    hits = np.array([True, False, True])
    assert average_precision(hits, mode="official") == pytest.approx(19 / 24)


def test_official_ap_when_first_hit_is_not_rank_one():
    # hits at ranks 2, 3. torchreid: (1/2 + 2/3) / 2 = 7/12.
    # official: hit 1: (0/1 + 1/2) / 2 = 1/4; hit 2: (1/2 + 2/3) / 2 = 7/12; mean = 5/12.
    hits = np.array([False, True, True, False])
    assert average_precision(hits) == pytest.approx(7 / 12)
    assert average_precision(hits, mode="official") == pytest.approx(5 / 12)


def test_ap_without_hit_is_an_error():
    with pytest.raises(ValueError, match="without a hit"):
        average_precision(np.zeros(4, dtype=bool))


def test_unknown_ap_mode_lists_the_modes():
    with pytest.raises(ValueError, match="torchreid, official"):
        average_precision(np.array([True]), mode="market")


# --------------------------------------------------------------------------------------------
# cmc_map protocol rules, by hand (one query unless said otherwise)


def one_query(dists, g_pids, g_camids, q_pid=1, q_camid=1, **kw):
    return cmc_map(
        np.array([dists], dtype=np.float32),
        np.array([q_pid]),
        np.array(g_pids),
        np.array([q_camid]),
        np.array(g_camids),
        **kw,
    )


def test_same_camera_true_match_is_dropped():
    # ranked: [pid 1 cam 1 (junk), pid 2 cam 2, pid 1 cam 2] -> after junk: [miss, hit]
    m = one_query([0.1, 0.2, 0.3], g_pids=[1, 2, 1], g_camids=[1, 2, 2], max_rank=3)
    assert m.cmc.tolist() == [0.0, 1.0, 1.0]
    assert m.mAP == pytest.approx(1 / 2)
    assert m.mINP == pytest.approx(1 / 2)


def test_same_pid_other_camera_counts_and_other_pid_same_camera_is_a_negative():
    # pid 2 in the query's camera is a plain negative; pid 1 in camera 2 is the hit at rank 2
    m = one_query([0.1, 0.2], g_pids=[2, 1], g_camids=[1, 2], max_rank=2)
    assert m.cmc.tolist() == [0.0, 1.0]
    assert m.mAP == pytest.approx(1 / 2)


def test_pid0_distractor_counts_as_a_negative():
    # a distractor (pid 0) ranked first pushes the true match to rank 2
    m = one_query([0.1, 0.2], g_pids=[0, 1], g_camids=[1, 2], max_rank=2)
    assert m.cmc.tolist() == [0.0, 1.0]
    assert m.mAP == pytest.approx(1 / 2)


def test_query_without_true_match_is_skipped_and_counted():
    distmat = np.array([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]], dtype=np.float32)
    q_pids, q_camids = np.array([1, 2]), np.array([1, 1])
    # query 1 (pid 2) has only a same-camera match -> skipped; query 0 hits at rank 2
    g_pids, g_camids = np.array([3, 1, 2]), np.array([2, 2, 1])
    m = cmc_map(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=3)
    assert m.num_valid_queries == 1
    assert m.num_skipped_queries == 1
    assert m.cmc.tolist() == [0.0, 1.0, 1.0]
    assert m.mAP == pytest.approx(1 / 2)


def test_all_queries_skipped_is_a_dataset_error():
    with pytest.raises(DatasetError, match="no query has a true match"):
        one_query([0.1, 0.2], g_pids=[1, 2], g_camids=[1, 2])


def test_ties_keep_gallery_order():
    # equal distances: the lower gallery index ranks first
    m = one_query([0.5, 0.5], g_pids=[2, 1], g_camids=[2, 2], max_rank=2)
    assert m.cmc.tolist() == [0.0, 1.0]
    m = one_query([0.5, 0.5], g_pids=[1, 2], g_camids=[2, 2], max_rank=2)
    assert m.cmc.tolist() == [1.0, 1.0]


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0 as floats: a tie, so gallery order decides (the negative is first)
    m = one_query([0.0, -0.0], g_pids=[2, 1], g_camids=[2, 2], max_rank=2)
    assert m.cmc.tolist() == [0.0, 1.0]


def test_both_ap_modes_by_hand():
    # ranked: hit, miss, hit, miss -> torchreid 5/6, official 19/24
    dists, g_pids, g_camids = [0.1, 0.2, 0.3, 0.4], [1, 2, 1, 3], [2, 2, 3, 2]
    assert one_query(dists, g_pids, g_camids).mAP == pytest.approx(5 / 6)
    official = one_query(dists, g_pids, g_camids, ap_mode="official")
    assert official.mAP == pytest.approx(19 / 24)
    assert official.ap_mode == "official"


def test_minp_by_hand():
    # query 0: hits at ranks 1 and 3 -> INP 2/3; query 1: one hit at rank 2 -> INP 1/2
    distmat = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    g_pids = np.array([1, 2, 1, 3])
    g_camids = np.array([2, 2, 3, 2])
    m = cmc_map(distmat, np.array([1, 2]), g_pids, np.array([1, 1]), g_camids, max_rank=4)
    assert m.mINP == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m.mAP == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert m.cmc.tolist() == [0.5, 1.0, 1.0, 1.0]
    assert m.rank(1) == 0.5


def test_max_rank_cuts_the_cmc():
    # the only hit is at rank 3: a CMC cut at 2 never sees it, but AP does
    m = one_query([0.1, 0.2, 0.3], g_pids=[2, 3, 1], g_camids=[2, 2, 2], max_rank=2)
    assert m.cmc.tolist() == [0.0, 0.0]
    assert m.mAP == pytest.approx(1 / 3)


def test_cmc_past_a_short_gallery_repeats_the_last_value():
    m = one_query([0.2, 0.1], g_pids=[1, 2], g_camids=[2, 2], max_rank=5)
    assert m.cmc.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_nan_distance_to_a_true_match_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        one_query([0.1, np.nan], g_pids=[2, 1], g_camids=[2, 2])


def test_match_ranks_lists_every_hit_in_rank_order():
    distmat = np.array([[0.4, 0.1, 0.3, 0.2]], dtype=np.float32)
    ranked = match_ranks(
        distmat, np.array([1]), np.array([1, 1, 2, 1]), np.array([0]), np.array([1, 1, 1, 0])
    )
    # gallery 3 is junk (same camera); order: g1 (hit), g2, g0 (hit) -> ranks 1, 3
    assert ranked.ranks.tolist() == [1, 3]
    assert ranked.counts.tolist() == [2]


# --------------------------------------------------------------------------------------------
# Randomised agreement with the naive reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("ap_mode", ["torchreid", "official"])
def test_matches_naive_reference_on_random_problems(dtype, ap_mode):
    rng = np.random.default_rng(0)
    for trial in range(40):
        num_q = int(rng.integers(1, 30))
        num_g = int(rng.integers(1, 120))
        levels = [None, 3, 10][trial % 3]  # continuous, heavy ties, some ties
        problem = random_problem(
            rng, num_q, num_g, int(rng.integers(1, 8)), int(rng.integers(1, 4)), levels, dtype
        )
        max_rank = int(rng.integers(1, 20))
        if not _has_valid(*problem):
            with pytest.raises(DatasetError):
                cmc_map(*problem, max_rank=max_rank, ap_mode=ap_mode)
            continue
        cmc, mean_ap, minp, valid, skipped = naive_cmc_map(
            *problem, max_rank=max_rank, ap_mode=ap_mode
        )
        chunk_size = int(rng.integers(1, 8))
        m = cmc_map(*problem, max_rank=max_rank, ap_mode=ap_mode, chunk_size=chunk_size)
        np.testing.assert_allclose(m.cmc, cmc, rtol=0, atol=1e-12)
        assert m.mAP == pytest.approx(mean_ap, abs=1e-12)
        assert m.mINP == pytest.approx(minp, abs=1e-12)
        assert (m.num_valid_queries, m.num_skipped_queries) == (valid, skipped)


def _has_valid(distmat, q_pids, g_pids, q_camids, g_camids):
    same = q_pids[:, None] == g_pids[None, :]
    return bool((same & (q_camids[:, None] != g_camids[None, :])).any())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_naive_reference_on_a_medium_problem(dtype):
    rng = np.random.default_rng(1)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 200, 1500, 60, 6, 50, dtype)
    q_pids[:10] = 999  # identities absent from the gallery: skipped
    problem = (distmat, q_pids, g_pids, q_camids, g_camids)
    for ap_mode in ("torchreid", "official"):
        cmc, mean_ap, minp, valid, skipped = naive_cmc_map(*problem, ap_mode=ap_mode)
        m = cmc_map(*problem, ap_mode=ap_mode, chunk_size=64)
        np.testing.assert_allclose(m.cmc, cmc, rtol=0, atol=1e-12)
        assert m.mAP == pytest.approx(mean_ap, abs=1e-12)
        assert m.mINP == pytest.approx(minp, abs=1e-12)
        assert m.num_skipped_queries == skipped >= 10


def test_official_mode_reads_lower_than_torchreid():
    problem = random_problem(np.random.default_rng(2), 50, 400, 20, 4)
    torchreid = cmc_map(*problem).mAP
    official = cmc_map(*problem, ap_mode="official").mAP
    assert official < torchreid


# --------------------------------------------------------------------------------------------
# distance_matrix


def test_cosine_distance_is_one_minus_cosine_similarity():
    rng = np.random.default_rng(3)
    q, g = rng.standard_normal((7, 16)), rng.standard_normal((11, 16))
    q_unit = q / np.linalg.norm(q, axis=1, keepdims=True)
    g_unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = 1 - q_unit @ g_unit.T
    distmat = distance_matrix(q.astype(np.float32), g.astype(np.float32), chunk_size=3)
    assert distmat.dtype == np.float32 and distmat.shape == (7, 11)
    np.testing.assert_allclose(distmat, expected, atol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_euclidean_distances(metric):
    rng = np.random.default_rng(4)
    q, g = rng.standard_normal((5, 8)), rng.standard_normal((9, 8))
    expected = np.linalg.norm(q[:, None] - g[None], axis=2)
    if metric == "sqeuclidean":
        expected = expected**2
    distmat = distance_matrix(torch.from_numpy(q), torch.from_numpy(g), metric, chunk_size=2)
    np.testing.assert_allclose(distmat, expected, rtol=1e-5, atol=1e-5)


def test_distance_of_a_vector_to_itself_is_not_negative():
    x = np.random.default_rng(5).standard_normal((6, 32)).astype(np.float32) * 100
    assert (distance_matrix(x, x, "euclidean") >= 0).all()


def test_unknown_metric_lists_the_metrics():
    with pytest.raises(ValueError, match="cosine, euclidean"):
        distance_matrix(np.zeros((1, 2)), np.zeros((1, 2)), "manhattan")


# --------------------------------------------------------------------------------------------
# Official mode: every query counts, one without a true match scoring 0


def test_official_mode_averages_over_all_queries_by_hand():
    # query 0 (pid 1): ranked hit, miss, hit -> official AP 19/24, INP 2/3, CMC [1, 1, 1]
    # query 1 (pid 9): no gallery image of pid 9 -> 0 everywhere in official mode
    distmat = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], dtype=np.float32)
    q_pids, q_camids = np.array([1, 9]), np.array([1, 1])
    g_pids, g_camids = np.array([1, 2, 1]), np.array([2, 2, 3])
    official = cmc_map(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=3, ap_mode="official")
    assert official.mAP == pytest.approx((19 / 24 + 0) / 2)
    assert official.mINP == pytest.approx((2 / 3 + 0) / 2)
    assert official.cmc.tolist() == [0.5, 0.5, 0.5]
    assert (official.num_valid_queries, official.num_skipped_queries) == (1, 1)
    assert official.num_averaged_queries == 2
    # torchreid mode skips query 1: AP 5/6 over the one valid query
    skipped = cmc_map(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=3)
    assert skipped.mAP == pytest.approx(5 / 6)
    assert skipped.cmc.tolist() == [1.0, 1.0, 1.0]
    assert skipped.num_averaged_queries == 1


# --------------------------------------------------------------------------------------------
# The two ways to shortlist the entries before a match: both exact


@pytest.fixture
def histogram_calls(monkeypatch):
    """Counts the chunks whose candidates the histogram narrowed."""
    calls = []
    original = metrics._histogram_shortlist

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(metrics, "_histogram_shortlist", counted)
    return calls


@pytest.mark.parametrize("bins", [1, 2, 7, 4096])
@pytest.mark.parametrize("share", [0.0, 2.0])  # always narrow by the histogram, never
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_shortlists_match_the_naive_reference(
    monkeypatch, histogram_calls, bins, share, dtype
):
    monkeypatch.setattr(metrics, "HISTOGRAM_BINS", bins)
    monkeypatch.setattr(metrics, "SHORTLIST_SHARE", share)
    rng = np.random.default_rng(7)
    for trial in range(25):
        levels = [None, 4, 40][trial % 3]  # continuous, heavy ties, some ties
        sizes = [int(rng.integers(lo, hi)) for lo, hi in ((1, 25), (2, 150), (1, 6), (1, 4))]
        problem = random_problem(rng, *sizes, levels, dtype)
        if not _has_valid(*problem):
            continue
        for ap_mode in ("torchreid", "official"):
            cmc, mean_ap, minp, valid, skipped = naive_cmc_map(*problem, ap_mode=ap_mode)
            m = cmc_map(*problem, ap_mode=ap_mode, chunk_size=int(rng.integers(1, 9)))
            np.testing.assert_allclose(m.cmc, cmc, rtol=0, atol=1e-12)
            assert m.mAP == pytest.approx(mean_ap, abs=1e-12)
            assert m.mINP == pytest.approx(minp, abs=1e-12)
    assert bool(histogram_calls) == (share == 0.0)


@pytest.mark.parametrize("share", [0.0, 2.0])
def test_infinite_and_nan_distances_rank_as_numpy_sorts_them(monkeypatch, share):
    monkeypatch.setattr(metrics, "SHORTLIST_SHARE", share)
    rng = np.random.default_rng(8)
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(rng, 12, 60, 3, 3)
    true_match = (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] != g_camids[None, :])
    other = np.flatnonzero(~true_match.ravel())
    picks = rng.choice(other, 60, replace=False)
    distmat.ravel()[picks[:20]] = np.nan  # never a true match's distance
    distmat.ravel()[picks[20:40]] = np.inf
    distmat.ravel()[picks[40:]] = -np.inf
    distmat[0, np.flatnonzero(true_match[0])[:1]] = np.inf  # a true match at +inf
    distmat[1] = 0.25  # a row of ties
    problem = (distmat, q_pids, g_pids, q_camids, g_camids)
    assert _has_valid(*problem)
    for ap_mode in ("torchreid", "official"):
        cmc, mean_ap, minp, _, _ = naive_cmc_map(*problem, ap_mode=ap_mode)
        m = cmc_map(*problem, ap_mode=ap_mode, chunk_size=5)
        np.testing.assert_allclose(m.cmc, cmc, rtol=0, atol=1e-12)
        assert m.mAP == pytest.approx(mean_ap, abs=1e-12)
        assert m.mINP == pytest.approx(minp, abs=1e-12)


def test_the_histogram_narrows_deep_rankings_and_not_shallow_ones(histogram_calls):
    rng = np.random.default_rng(9)
    q_pids = np.repeat(np.arange(20), 2)
    g_pids = np.tile(np.arange(200), 5)
    q_camids, g_camids = np.zeros(40, int), np.ones(1000, int)
    same = q_pids[:, None] == g_pids[None, :]
    strong = (rng.random((40, 1000)) + 2.0 * ~same).astype(np.float32)  # matches first
    weak = rng.random((40, 1000)).astype(np.float32)  # matches anywhere
    for distmat in (strong, weak):
        expected = naive_cmc_map(distmat, q_pids, g_pids, q_camids, g_camids)
        got = cmc_map(distmat, q_pids, g_pids, q_camids, g_camids)
        assert got.mAP == pytest.approx(expected[1], abs=1e-12)
        if distmat is strong:
            assert histogram_calls == []  # a few candidates per query: sorted directly
    assert histogram_calls == [(40, 1000)]


def test_default_chunks_hold_a_fixed_number_of_entries(monkeypatch):
    shapes = []
    original = metrics._block_ranks

    def recorded(block, *args):
        shapes.append(block.shape)
        return original(block, *args)

    monkeypatch.setattr(metrics, "_block_ranks", recorded)
    monkeypatch.setattr(metrics, "CHUNK_ENTRIES", 1000)
    problem = random_problem(np.random.default_rng(10), 30, 300, 4, 3)
    match_ranks(*problem)
    assert {rows for rows, _ in shapes} <= {3} and sum(r for r, _ in shapes) <= 30
    shapes.clear()
    match_ranks(*problem, chunk_size=7)  # an explicit chunk size wins
    assert max(rows for rows, _ in shapes) == 7


# --------------------------------------------------------------------------------------------
# Features in, metrics out, a chunk of queries at a time


def sign_features(rng, num, dim=9):
    """Entries +-1: every norm is exactly 3, so squared euclidean distances are exact."""
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), (num, dim))


def test_features_path_equals_the_naive_reference_on_exact_distances(monkeypatch):
    # +-1 features: squared euclidean distances are exact small integers, with many ties
    monkeypatch.setattr(metrics, "PRODUCT_ENTRIES", 5 * 40)  # products of 5 queries
    monkeypatch.setattr(metrics, "CHUNK_ENTRIES", 2 * 40)  # ranked 2 at a time
    rng = np.random.default_rng(11)
    q, g = sign_features(rng, 23), sign_features(rng, 40)
    q_pids, g_pids = rng.integers(0, 6, 23), rng.integers(0, 6, 40)
    q_pids[5:9] = 99  # a run of queries without a match: chunks skipped
    q_camids, g_camids = rng.integers(0, 3, 23), rng.integers(0, 3, 40)
    exact = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    ids = (q_pids, g_pids, q_camids, g_camids)
    for ap_mode in ("torchreid", "official"):
        cmc, mean_ap, minp, valid, skipped = naive_cmc_map(exact, *ids, ap_mode=ap_mode)
        m = cmc_map_from_features(q, g, *ids, ap_mode=ap_mode, metric="sqeuclidean")
        np.testing.assert_allclose(m.cmc, cmc, rtol=0, atol=1e-12)
        assert m.mAP == pytest.approx(mean_ap, abs=1e-12)
        assert m.mINP == pytest.approx(minp, abs=1e-12)
        assert (m.num_valid_queries, m.num_skipped_queries) == (valid, skipped)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_features_path_equals_cmc_map_of_the_distance_matrix(monkeypatch, metric):
    monkeypatch.setattr(metrics, "PRODUCT_ENTRIES", 7 * 90)
    rng = np.random.default_rng(12)
    q, g = rng.standard_normal((30, 16)), rng.standard_normal((90, 16))
    ids = (rng.integers(0, 9, 30), rng.integers(0, 9, 90), rng.integers(0, 3, 30),
           rng.integers(0, 3, 90))  # fmt: skip
    # the same 7-row products as distance_matrix's chunks, so the same float32 values
    expected = cmc_map(distance_matrix(q, g, metric, chunk_size=7), *ids, chunk_size=3)
    got = cmc_map_from_features(q, g, *ids, metric=metric, chunk_size=3)
    np.testing.assert_array_equal(got.cmc, expected.cmc)
    assert (got.mAP, got.mINP) == (expected.mAP, expected.mINP)


def test_features_path_memory_is_bounded_by_a_chunk(monkeypatch):
    import tracemalloc

    rng = np.random.default_rng(13)
    num_q, num_g = 400, 20_000
    q = rng.standard_normal((num_q, 8)).astype(np.float32)
    g = rng.standard_normal((num_g, 8)).astype(np.float32)
    # 1,000 identities: some 20 gallery images each, about MSMT17's 27
    ids = (rng.integers(0, 1000, num_q), rng.integers(0, 1000, num_g),
           rng.integers(0, 4, num_q), rng.integers(0, 4, num_g))  # fmt: skip
    full_matrix = num_q * num_g * 4

    def peak(**kw) -> int:
        tracemalloc.start()
        cmc_map_from_features(q, g, *ids, **kw)
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak_bytes

    monkeypatch.setattr(metrics, "PRODUCT_ENTRIES", 20 * num_g)
    monkeypatch.setattr(metrics, "CHUNK_ENTRIES", 10 * num_g)
    small = peak()
    monkeypatch.setattr(metrics, "PRODUCT_ENTRIES", num_q * num_g)
    monkeypatch.setattr(metrics, "CHUNK_ENTRIES", num_q * num_g)
    whole = peak()
    assert small < full_matrix / 5  # a chunk of 20 queries, not the 400 x 20,000 matrix
    assert whole > full_matrix  # one chunk of everything holds the matrix and more
