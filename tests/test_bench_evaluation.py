"""bench/evaluation.py's own logic: the evenly spread distances and the choice of its peer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from reidkit.retrieval.metrics import cmc_map

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "evaluation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("evaluation_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_ids(bench, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng, bench.market_like_ids(rng, 60, 900)


def test_evenly_spread_puts_each_querys_matches_at_evenly_spaced_ranks(bench):
    rng, (q_pids, q_camids, g_pids, g_camids) = small_ids(bench)
    distmat = bench.evenly_spread_distances(rng, q_pids, q_camids, g_pids, g_camids)
    assert distmat.dtype == np.float32 and distmat.shape == (60, 900)
    for i in range(60):
        row = distmat[i]
        assert len(np.unique(row)) == 900  # no ties for an unstable sort to order its own way
        rank = np.argsort(row).argsort()  # 0-based position of every gallery entry
        matches = np.flatnonzero((g_pids == q_pids[i]) & (g_camids != q_camids[i]))
        k = len(matches)
        # k matches split the 900 ranks into k equal stretches, one match in each one's middle
        expected = ((np.arange(k) + 0.5) * 900 / k).astype(int)
        np.testing.assert_array_equal(np.sort(rank[matches]), expected)


def test_without_a_source_the_peer_is_the_stand_in_and_says_so(bench):
    said = []
    peer = bench.choose_peer(None, said.append)
    assert peer.name == "torchreid stand-in (argsort + gather)"
    assert said == [peer.note]
    assert "NOT torchreid's compiled code" in peer.note and "--torchreid-source" in peer.note
    assert "not judged" in bench.target_line([], peer)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp / "missing.pyx", "no torchreid source at"),
        (lambda tmp: tmp, "no torchreid source at"),  # a folder without torchreid/metrics/...
        (lambda tmp: write(tmp / "other.pyx", "def f(): pass\n"), "is not torchreid's rank_cy"),
    ],
    ids=["missing file", "checkout without it", "another pyx"],
)
def test_an_unusable_source_falls_back_naming_why(bench, tmp_path, make, reason):
    said = []
    peer = bench.choose_peer(make(tmp_path), said.append)
    assert peer.run is bench.torchreid_standin
    assert reason in said[0] and "stand-in" in said[0]


def test_without_cython_the_peer_is_the_stand_in(bench, tmp_path, monkeypatch):
    source = write(tmp_path / "rank_cy.pyx", "cpdef eval_market1501_cy(): pass\n")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "Cython" else real_find_spec(name, *a),
    )
    said = []
    peer = bench.choose_peer(source, said.append)
    assert peer.run is bench.torchreid_standin
    assert "Cython is not installed (pip install cython)" in said[0]


@pytest.mark.skipif(
    not os.environ.get("TORCHREID_SOURCE") or importlib.util.find_spec("Cython") is None,
    reason="needs TORCHREID_SOURCE (torchreid's rank_cy.pyx) and Cython",
)
def test_torchreids_compiled_evaluation_agrees_with_cmc_map(bench):
    rng, ids = small_ids(bench, seed=1)
    q_pids, q_camids, g_pids, g_camids = ids
    peer = bench.choose_peer(Path(os.environ["TORCHREID_SOURCE"]), lambda _: None)
    assert peer.name == "torchreid evaluate_cy (compiled)"
    for distmat in (
        bench.evenly_spread_distances(rng, *ids),
        rng.random((60, 900), dtype=np.float32) + (g_pids[None] != q_pids[:, None]),
    ):
        cmc, mean_ap = peer.run(distmat, q_pids, g_pids, q_camids, g_camids)
        ours = cmc_map(distmat, q_pids, g_pids, q_camids, g_camids)
        np.testing.assert_allclose(cmc, ours.cmc, atol=bench.PEER_CMC_TOLERANCE)
        assert mean_ap == pytest.approx(ours.mAP, abs=bench.PEER_MAP_TOLERANCE)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
