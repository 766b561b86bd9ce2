"""The chance rank-1 printed beside every evaluation, worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from reidkit.retrieval.metrics import chance_rank1

# query a (pid 1, camera 1): 2 true matches (b, e) among the 4 entries kept (a1 is dropped):
# 1/2. Query f (pid 2, camera 2): 1 true match (c) among all 5 entries: 1/5. Query g (pid 2,
# camera 1): its only same-pid entry, c, is in its own camera, so it has no true match.
Q_PIDS, Q_CAMIDS = np.array([1, 2, 2]), np.array([1, 2, 1])
#                       a1 b  c  d(distractor) e
G_PIDS, G_CAMIDS = np.array([1, 1, 2, 0, 1]), np.array([1, 2, 1, 2, 3])


def test_chance_rank1_averages_over_queries_with_a_match_like_torchreid_cmc():
    rank1 = chance_rank1(Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS)
    assert rank1 == pytest.approx((1 / 2 + 1 / 5) / 2)


def test_official_mode_averages_over_every_query_one_without_a_match_scoring_0():
    rank1 = chance_rank1(Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS, ap_mode="official")
    assert rank1 == pytest.approx((1 / 2 + 1 / 5 + 0) / 3)


def test_chance_rank1_is_the_mean_hit_rate_of_random_rankings():
    # an independent check: rank the gallery at random many times, apply the protocol, count
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(20_000):
        for pid, camid in zip(Q_PIDS, Q_CAMIDS, strict=True):
            keep = ~((G_PIDS == pid) & (G_CAMIDS == camid))
            if not (keep & (G_PIDS == pid)).any():
                continue
            order = rng.permutation(np.flatnonzero(keep))
            hits.append(G_PIDS[order[0]] == pid)
    assert np.mean(hits) == pytest.approx(
        chance_rank1(Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS), abs=0.01
    )
