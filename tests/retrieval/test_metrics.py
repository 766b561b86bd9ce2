"""CMC / mAP / mINP: hand-worked cases for each protocol rule, and a naive per-query reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reidkit.errors import DatasetError
from reidkit.retrieval.metrics import (
    average_precision,
    cmc_map,
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
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps), skipped


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
