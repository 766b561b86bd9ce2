"""Milvus galleries (Milvus Lite here): the same rankings and filters as the in-memory path,
what made them recorded and checked, and nothing of anyone else's replaced or dropped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reidkit.retrieval import milvus
from reidkit.retrieval.filters import GalleryFilter, TimeBound
from reidkit.retrieval.gallery import GalleryModelError, check_model, open_gallery
from reidkit.retrieval.index import l2_normalize
from reidkit.retrieval.milvus import (
    GalleryWriter,
    MilvusError,
    MilvusGallery,
    check_destination,
    connect,
    parse_target,
)

MODEL = {"checkpoint": "/runs/a/last.pt", "checkpoint_sha256": "a" * 64, "feature_kind": "g"}
MODEL = {**MODEL, "flip": False}
N, DIM = 240, 16


def gallery_rows(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    features = l2_normalize(rng.standard_normal((N, DIM)).astype(np.float32))
    meta = pd.DataFrame(
        {
            "path": [
                f"/g/cam_{i % 6}/{i:04d}.jpg" if i % 7 else f"/g/camX{i % 6}/{i}.jpg"
                for i in range(N)
            ],  # fmt: skip
            "pid": np.arange(N) // 4,
            "camid": np.arange(N) % 6,
            "frame": np.where(np.arange(N) % 5 == 0, -1, np.arange(N) * 10),
            "timestamp": np.full(N, -1),
        }
    )
    return features, meta


def write(target, features, meta, *, model=MODEL, kind="flat", batches=2):
    with GalleryWriter(target, dim=DIM, num_rows=len(meta), index_kind=kind, info=model) as w:
        for part in np.array_split(np.arange(len(meta)), batches):
            w.add(features[part], meta.iloc[part])
        w.commit()


@pytest.fixture(scope="module")
def stored(milvus_db):
    """One FLAT gallery written in two batches, shared by the read-only tests below."""
    features, meta = gallery_rows()
    target = parse_target(milvus_db, "shared")
    write(target, features, meta)
    gallery = MilvusGallery.open(target)
    yield gallery, features, meta
    gallery.close()


def reference(features, meta, queries, k, where=None):
    """A stable argsort of the cosine over the rows the filter keeps (the independent oracle)."""
    rows = np.arange(len(meta)) if where is None else np.flatnonzero(where.mask(meta))
    sims = l2_normalize(queries) @ features[rows].T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), rows[order]


def test_rows_keep_their_order_metadata_and_what_made_them(stored):
    gallery, features, meta = stored
    assert gallery.ntotal == N and gallery.dim == DIM
    assert gallery.info["checkpoint_sha256"] == MODEL["checkpoint_sha256"]
    assert gallery.info["milvus_index"] == "FLAT" and gallery.info["metric"] == "IP"
    # the timestamp column is all -1: not a field this gallery carries
    assert gallery.fields == ("path", "pid", "camid", "frame")
    picked = np.array([239, 0, 120, 7])
    pd.testing.assert_frame_equal(
        gallery.rows_meta(picked), meta.iloc[picked].reset_index(drop=True)
    )


def test_flat_search_ranks_as_exact_cosine(stored):
    gallery, features, meta = stored
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    scores, rows = gallery.search(queries * 3.0, 20)  # queries need not be unit length
    want_scores, want_rows = reference(features, meta, queries, 20)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize(
    "where",
    [
        GalleryFilter(cameras=(3, 4, 5)),
        GalleryFilter(after=TimeBound("frame", 500), before=TimeBound("frame", 1500)),
        GalleryFilter(path_prefix="/g/cam_1/"),  # '_' is a character, not LIKE's wildcard
        GalleryFilter(cameras=(1,), after=TimeBound("frame", 1000), path_prefix="/g/"),
    ],
    ids=["cameras", "frames", "prefix", "all"],
)
def test_filtered_search_in_milvus_keeps_the_rows_the_mask_keeps(stored, where):
    gallery, features, meta = stored
    queries = np.random.default_rng(2).standard_normal((4, DIM)).astype(np.float32)
    _, rows = gallery.search(queries, 15, where=where)
    _, want_rows = reference(features, meta, queries, 15, where)
    kept = np.flatnonzero(where.mask(meta))
    assert 0 < len(kept) < N
    width = min(15, len(kept))
    np.testing.assert_array_equal(rows[:, :width], want_rows)
    assert (rows[:, width:] == -1).all()


def test_rows_split_over_many_requests_keep_their_numbers(milvus_db, monkeypatch):
    # 64 rows of 16 floats a request: each add() below is several inserts
    monkeypatch.setattr(milvus, "REQUEST_BYTES", 64 * DIM * 4)
    features, meta = gallery_rows(7)
    target = parse_target(milvus_db, "many_requests")
    write(target, features, meta, batches=3)
    gallery = MilvusGallery.open(target)
    pd.testing.assert_frame_equal(gallery.rows_meta(np.arange(N)), meta)
    _, rows = gallery.search(features, 1)
    assert (rows[:, 0] == np.arange(N)).all()  # every row's vector sits at its own number


def test_a_filter_on_a_field_the_gallery_lacks_is_refused(stored):
    gallery, _, _ = stored
    where = GalleryFilter(after=TimeBound("timestamp", 0))
    with pytest.raises(Exception, match="has no timestamp values"):
        gallery.search(np.ones((1, DIM), np.float32), 3, where=where)


def test_open_gallery_reads_milvus_addresses(stored, milvus_db):
    gallery = open_gallery(milvus_db, "shared")
    assert isinstance(gallery, MilvusGallery) and gallery.ntotal == N
    with pytest.raises(MilvusError, match=r"no collection absent in .* \(it holds .*shared"):
        open_gallery(milvus_db, "absent")


def test_another_model_is_refused_by_name(stored):
    gallery, _, _ = stored
    other = {**MODEL, "checkpoint_sha256": "b" * 64}
    with pytest.raises(GalleryModelError, match=r"holds features of /runs/a/last.pt \(sha256 aaaa"):
        check_model(gallery.info, other, gallery.name)
    check_model(gallery.info, {**MODEL, "checkpoint": "/moved/last.pt"}, gallery.name)  # same


@pytest.mark.parametrize(("kind", "index_type"), [("ivf", "IVF_FLAT"), ("hnsw", "HNSW")])
def test_index_kind_builds_that_milvus_index(milvus_db, kind, index_type):
    features, meta = gallery_rows(3)
    target = parse_target(milvus_db, f"kind_{kind}")
    write(target, features, meta, kind=kind)
    client = connect(target)
    described = client.describe_index(target.collection, client.list_indexes(target.collection)[0])
    assert described["index_type"] == index_type
    gallery = MilvusGallery.open(target)
    queries = features[:10]
    _, rows = gallery.search(queries, 5)
    assert (rows[:, 0] == np.arange(10)).all()  # approximate, but each row finds itself


def test_same_model_replaces_its_gallery_and_leaves_no_temporary(milvus_db):
    target = parse_target(milvus_db, "replaced")
    features, meta = gallery_rows(4)
    write(target, features, meta)
    check_destination(target, MODEL)  # its own gallery: may be replaced
    write(target, features[:100], meta.iloc[:100])
    gallery = MilvusGallery.open(target)
    assert gallery.ntotal == 100
    _, rows = gallery.search(features[:3], 200)
    assert rows.max() < 100  # only the new rows are there
    names = connect(target).list_collections()
    assert not [name for name in names if "_reidkit_tmp_" in name]


def test_interrupted_write_keeps_the_previous_gallery(milvus_db):
    target = parse_target(milvus_db, "interrupted")
    features, meta = gallery_rows(5)
    write(target, features, meta)
    with pytest.raises(KeyboardInterrupt):
        with GalleryWriter(target, dim=DIM, num_rows=N, index_kind="flat", info=MODEL) as w:
            w.add(features[:10], meta.iloc[:10])
            raise KeyboardInterrupt
    assert MilvusGallery.open(target).ntotal == N
    names = connect(target).list_collections()
    assert not [name for name in names if "_reidkit_tmp_" in name]


def test_collections_of_others_are_refused_and_kept(milvus_db):
    target = parse_target(milvus_db, "not_ours")
    client = connect(target, create=True)
    client.create_collection("not_ours", dimension=DIM)
    with pytest.raises(MilvusError, match="collection not_ours .* was not written by reidkit"):
        check_destination(target, MODEL)
    with pytest.raises(MilvusError, match="was not written by reidkit `extract`"):
        MilvusGallery.open(target)
    assert client.has_collection("not_ours")  # nothing dropped
    features, meta = gallery_rows(6)
    other_model = parse_target(milvus_db, "other_model")
    write(other_model, features, meta, model={**MODEL, "feature_kind": "h"})
    with pytest.raises(MilvusError, match="holds the gallery of .*feature h, flip off, not .*g"):
        check_destination(other_model, MODEL)
    assert MilvusGallery.open(other_model).ntotal == N


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("milvus:gallery", "is not a Milvus address: give milvus:PATH.db"),
        ("milvus:x.db", "--collection 'bad-name': a Milvus collection name is letters"),
    ],
)
def test_bad_addresses_say_what_to_give(text, message):
    with pytest.raises(MilvusError, match=message):
        parse_target(text, "bad-name" if text.endswith(".db") else None)


def test_unreachable_server_is_one_line_naming_it():
    target = parse_target("milvus:http://127.0.0.1:9", "g")  # the discard port: nobody listens
    with pytest.raises(MilvusError) as err:
        connect(target)
    message = str(err.value)
    assert message.startswith("cannot reach the Milvus server at http://127.0.0.1:9 (")
    assert "start it or check the address" in message and "\n" not in message


def test_lite_refuses_a_file_and_a_folder_of_other_files(tmp_path: Path):
    (tmp_path / "notes.db").write_text("mine")
    with pytest.raises(MilvusError, match="notes.db is a file"):
        check_destination(parse_target(f"milvus:{tmp_path / 'notes.db'}"), MODEL)
    (tmp_path / "photos.db").mkdir()
    (tmp_path / "photos.db" / "a.jpg").write_text("mine")
    with pytest.raises(MilvusError, match="photos.db is a folder that is not a Milvus Lite"):
        connect(parse_target(f"milvus:{tmp_path / 'photos.db'}"), create=True)
    assert (tmp_path / "notes.db").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "photos.db").iterdir()) == ["a.jpg"]
    with pytest.raises(MilvusError, match=r"no Milvus Lite database at .*absent.db; build one"):
        connect(parse_target(f"milvus:{tmp_path / 'absent.db'}"))
    assert not (tmp_path / "absent.db").exists()  # reading created nothing


def test_without_pymilvus_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus now fails
    with pytest.raises(MilvusError, match=r"pip install 'reidkit\[milvus\]'"):
        milvus.import_pymilvus()
