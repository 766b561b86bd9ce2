"""Indexes behind one search signature, and index folders that load whole or not at all."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reidkit import __version__
from reidkit.errors import IndexFolderError
from reidkit.retrieval import index as index_module
from reidkit.retrieval.index import (
    ExactIndex,
    FaissIndex,
    FaissMissingError,
    build_index,
    l2_normalize,
    load_index_folder,
    save_index_folder,
)


def random_features(rng, n, dim=32):
    return rng.standard_normal((n, dim)).astype(np.float32)


def clustered_features(rng, n, dim=48, clusters=100, noise=0.35):
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + noise * rng.standard_normal((n, dim))).astype(np.float32)


def meta_for(n):
    return pd.DataFrame(
        {
            "path": [f"img/{i:04d}_c1.jpg" for i in range(n)],
            "pid": np.arange(n) % 7,
            "camid": np.arange(n) % 3,
        }
    )


INFO = {"checkpoint": Path("runs/x/ckpt.pt"), "feature_kind": "pool"}  # a Path is fine


# --------------------------------------------------------------------------------------------
# search


def test_exact_index_is_a_stable_sort_by_descending_cosine():
    rng = np.random.default_rng(0)
    gallery, queries = random_features(rng, 300), random_features(rng, 20)
    sims = l2_normalize(queries) @ l2_normalize(gallery).T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    scores, indices = build_index(gallery, "exact").search(queries, 10)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, 1), atol=1e-5)


def test_exact_index_breaks_ties_by_lower_index_even_at_the_cut():
    # rows 1, 3, 4, 6 are the same vector: a k=2 cut falls inside the tie
    gallery = np.eye(4, dtype=np.float32)[[1, 0, 2, 0, 0, 3, 0]]
    _, indices = ExactIndex(gallery).search(np.eye(4, dtype=np.float32)[[0]], 2)
    assert indices.tolist() == [[1, 3]]
    _, indices = ExactIndex(gallery).search(np.eye(4, dtype=np.float32)[[0]], 5)
    assert indices[0, :4].tolist() == [1, 3, 4, 6]


def test_faiss_flat_equals_exact_on_random_data():
    rng = np.random.default_rng(1)
    gallery, queries = random_features(rng, 2000, 64), random_features(rng, 100, 64)
    exact_scores, exact_idx = build_index(gallery, "exact").search(queries, 20)
    flat = build_index(gallery, "flat")
    assert isinstance(flat, FaissIndex)
    flat_scores, flat_idx = flat.search(queries, 20)
    np.testing.assert_allclose(flat_scores, exact_scores, atol=1e-5)
    # Indices agree wherever the score is not (numerically) tied with a neighbour.
    tied = np.zeros_like(exact_idx, dtype=bool)
    close = np.abs(np.diff(exact_scores, axis=1)) < 1e-5
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    np.testing.assert_array_equal(flat_idx[~tied], exact_idx[~tied])
    assert (~tied).mean() > 0.99


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall_at_10(kind):
    rng = np.random.default_rng(2)
    data = clustered_features(rng, 8200)
    gallery, queries = data[:8000], data[8000:]
    _, truth = build_index(gallery, "exact").search(queries, 10)
    _, found = build_index(gallery, kind).search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall > 0.9


@pytest.mark.parametrize("kind", ["exact", "flat", "ivf", "hnsw"])
def test_search_among_rows_returns_only_those_rows_best_first(kind):
    rng = np.random.default_rng(5)
    gallery, queries = (
        clustered_features(rng, 1200, dim=16, clusters=20),
        random_features(rng, 8, 16),
    )
    rows = np.flatnonzero(rng.random(1200) < 0.1)  # a filter that keeps about 120 rows
    # the reference: a stable argsort of the cosine over the kept rows alone
    sims = l2_normalize(queries) @ l2_normalize(gallery[rows]).T
    expected = rows[np.argsort(-sims, axis=1, kind="stable")[:, :10]]
    index = build_index(gallery, kind, nprobe=64)  # ivf probes every list: exact on a subset
    scores, found = index.search(queries, 10, rows=rows[::-1])  # any order of rows
    assert np.isin(found, rows).all()
    if kind in ("exact", "flat", "ivf"):
        np.testing.assert_array_equal(found, expected)
    else:  # hnsw is approximate, also among the kept rows
        recall = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(expected, found, strict=True)])
        assert recall > 0.8
    assert (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_search_among_fewer_rows_than_k_fills_the_rest_with_minus_one(kind):
    gallery = random_features(np.random.default_rng(6), 50, 8)
    scores, found = build_index(gallery, kind).search(gallery[:2], 5, rows=np.array([7, 3]))
    assert found.shape == (2, 2)  # k capped at the rows kept
    assert sorted(found[0].tolist()) == [3, 7]
    scores, found = build_index(gallery, kind).search(gallery[:2], 5, rows=np.array([], int))
    assert found.shape == scores.shape == (2, 0)


def test_k_is_capped_at_the_gallery_size():
    gallery = random_features(np.random.default_rng(3), 5)
    for kind in ("exact", "flat"):
        scores, indices = build_index(gallery, kind).search(gallery[:2], 10)
        assert scores.shape == indices.shape == (2, 5)
        assert sorted(indices[0].tolist()) == [0, 1, 2, 3, 4]


def test_query_dimension_mismatch_is_refused():
    index = build_index(random_features(np.random.default_rng(4), 10, 8), "flat")
    with pytest.raises(ValueError, match="dimension 9"):
        index.search(np.zeros((1, 9), dtype=np.float32), 3)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="flat, ivf, hnsw, exact"):
        build_index(np.zeros((3, 2), dtype=np.float32), "lsh")


def test_missing_faiss_says_how_to_install_and_exact_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    gallery = random_features(np.random.default_rng(5), 10)
    with pytest.raises(FaissMissingError, match="pip install faiss-cpu"):
        build_index(gallery, "flat")
    assert build_index(gallery, "exact").search(gallery[:1], 1)[1].tolist() == [[0]]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 fma avx512f avx512bw avx512dq avx512vl", "SkylakeX"),
        ("sse avx2 fma", "Haswell"),
        ("sse sse2", None),
    ],
)
def test_openblas_core_is_pinned_from_cpu_flags(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "recorded")  # so teardown restores the original
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.setattr(index_module, "open", lambda path: open(cpuinfo), raising=False)
    index_module._pin_openblas_core()
    assert index_module.os.environ.get("OPENBLAS_CORETYPE") == expected
    # a user's own setting is never overridden
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    index_module._pin_openblas_core()
    assert index_module.os.environ["OPENBLAS_CORETYPE"] == "Prescott"


# --------------------------------------------------------------------------------------------
# index folders


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "exact"])
def test_save_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(6)
    features = clustered_features(rng, 2000, dim=16, clusters=20)
    index = build_index(features, kind)
    meta = meta_for(2000)
    save_index_folder(tmp_path / "gallery", index, features, meta, INFO)
    loaded = load_index_folder(tmp_path / "gallery")
    queries = features[:50] + 0.1
    before, after = index.search(queries, 10), loaded.index.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    pd.testing.assert_frame_equal(loaded.meta, meta)
    np.testing.assert_array_equal(loaded.features, features)
    assert loaded.index.kind == kind
    assert loaded.info["index_kind"] == kind
    assert loaded.info["dim"] == 16 and loaded.info["num_rows"] == 2000
    assert loaded.info["checkpoint"] == "runs/x/ckpt.pt"
    assert loaded.info["feature_kind"] == "pool"
    assert loaded.info["reidkit_version"] == __version__


@pytest.fixture
def good_folder(tmp_path):
    features = random_features(np.random.default_rng(7), 40, 8)
    folder = tmp_path / "gallery"
    save_index_folder(folder, build_index(features, "flat"), features, meta_for(40), INFO)
    return folder


@pytest.mark.parametrize("name", ["index.faiss", "meta.csv", "features.npy", "info.json"])
def test_missing_file_is_named(good_folder, name):
    (good_folder / name).unlink()
    with pytest.raises(IndexFolderError, match=rf"{name} missing.*reidkit extract"):
        load_index_folder(good_folder)


def test_no_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexFolderError, match="no index folder.*reidkit extract"):
        load_index_folder(tmp_path / "nowhere")


def test_meta_rows_mismatch_fails(good_folder):
    meta = pd.read_csv(good_folder / "meta.csv")
    meta.iloc[:-1].to_csv(good_folder / "meta.csv", index=False)
    with pytest.raises(IndexFolderError, match=r"meta.csv has 39 rows but info.json says 40"):
        load_index_folder(good_folder)


def test_features_rows_mismatch_fails(good_folder):
    np.save(good_folder / "features.npy", np.zeros((41, 8), dtype=np.float32))
    with pytest.raises(IndexFolderError, match=r"features.npy holds float32 \(41, 8\)"):
        load_index_folder(good_folder)


def test_index_rows_mismatch_fails(good_folder):
    faiss = pytest.importorskip("faiss")
    small = faiss.IndexFlatIP(8)
    small.add(np.zeros((3, 8), dtype=np.float32))
    faiss.write_index(small, str(good_folder / "index.faiss"))
    with pytest.raises(IndexFolderError, match=r"index.faiss holds 3 rows"):
        load_index_folder(good_folder)


def test_dimension_mismatch_with_info_fails(good_folder):
    info = json.loads((good_folder / "info.json").read_text())
    info["dim"] = 16
    (good_folder / "info.json").write_text(json.dumps(info))
    with pytest.raises(IndexFolderError, match=r"features.npy .* \(40, 16\)"):
        load_index_folder(good_folder)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"dim": 8}', "lacks checkpoint"),
    ],
)
def test_malformed_info_fails(good_folder, text, message):
    (good_folder / "info.json").write_text(text)
    with pytest.raises(IndexFolderError, match=rf"info.json.*{message}|{message}.*info.json"):
        load_index_folder(good_folder)


def test_pickled_features_are_refused(good_folder):
    np.save(good_folder / "features.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(IndexFolderError, match="features.npy"):
        load_index_folder(good_folder)


def test_save_checks_its_inputs(tmp_path):
    features = random_features(np.random.default_rng(8), 10, 4)
    index = build_index(features, "flat")
    with pytest.raises(ValueError, match="checkpoint"):
        save_index_folder(tmp_path / "g", index, features, meta_for(10), {"feature_kind": "x"})
    with pytest.raises(ValueError, match="rows disagree"):
        save_index_folder(tmp_path / "g", index, features, meta_for(9), INFO)
    with pytest.raises(ValueError, match="camid"):
        save_index_folder(tmp_path / "g", index, features, meta_for(10)[["path", "pid"]], INFO)
    assert not (tmp_path / "g").exists()


def _fail_on_features(monkeypatch):
    """Make the third file's write fail, after index.faiss and meta.csv are on disk."""

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(index_module.np, "save", boom)


def test_interrupted_save_leaves_no_folder(tmp_path, monkeypatch):
    features = random_features(np.random.default_rng(9), 20, 4)
    _fail_on_features(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_index_folder(tmp_path / "g", build_index(features), features, meta_for(20), INFO)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind


def test_interrupted_save_keeps_the_previous_folder(good_folder, monkeypatch):
    before = load_index_folder(good_folder)
    old_result = before.index.search(before.features[:3], 5)
    features = random_features(np.random.default_rng(10), 25, 8)
    _fail_on_features(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save_index_folder(good_folder, build_index(features), features, meta_for(25), INFO)
    after = load_index_folder(good_folder)
    assert after.info["num_rows"] == 40
    np.testing.assert_array_equal(after.index.search(after.features[:3], 5)[1], old_result[1])
    assert sorted(p.name for p in good_folder.parent.iterdir()) == ["gallery"]


def test_killed_save_leaves_only_a_hidden_partial_that_does_not_load(good_folder, monkeypatch):
    # A process killed mid-write cannot clean up: simulate by also disabling the cleanup.
    monkeypatch.setattr(index_module.shutil, "rmtree", lambda *a, **k: None)
    features = random_features(np.random.default_rng(11), 25, 8)
    _fail_on_features(monkeypatch)
    with pytest.raises(OSError):
        save_index_folder(good_folder, build_index(features), features, meta_for(25), INFO)
    assert load_index_folder(good_folder).info["num_rows"] == 40  # the previous one, intact
    (partial,) = [p for p in good_folder.parent.iterdir() if p.name != "gallery"]
    assert partial.name.startswith(".gallery.reidkit-tmp-")
    with pytest.raises(IndexFolderError, match="features.npy, info.json missing"):
        load_index_folder(partial)


def test_save_replaces_a_previous_folder(good_folder):
    features = random_features(np.random.default_rng(12), 25, 8)
    save_index_folder(good_folder, build_index(features, "exact"), features, meta_for(25), INFO)
    loaded = load_index_folder(good_folder)
    assert loaded.info["num_rows"] == 25 and loaded.index.kind == "exact"
    assert sorted(p.name for p in good_folder.parent.iterdir()) == ["gallery"]


def test_saved_folder_and_files_follow_the_umask(tmp_path):
    features = random_features(np.random.default_rng(13), 10, 4)
    previous = os.umask(0o027)
    try:
        folder = save_index_folder(
            tmp_path / "g", build_index(features), features, meta_for(10), INFO
        )
    finally:
        os.umask(previous)
    # not mkdtemp's owner-only 0700: the group may read a shared index
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    for name in ("index.faiss", "meta.csv", "features.npy", "info.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o640, name
