"""Galleries end to end on the tiny set: extract into Milvus Lite and a FAISS folder, search
both with filters, evaluate from the database, and refuse what does not belong together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reidkit.data.loading import manifest_path, read_manifest
from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
from reidkit.engine.evaluate import run_evaluation
from reidkit.engine.search import build_gallery_index, search_index
from reidkit.errors import ReidkitError
from reidkit.models.net import build_model
from reidkit.retrieval.filters import GalleryFilter, GalleryFilterError, parse_time
from reidkit.retrieval.gallery import GalleryModelError, open_gallery
from reidkit.retrieval.milvus import MilvusError

COLLECTION = "tiny_gallery"


def untrained(config, path: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    save_checkpoint(path, Checkpoint(config, build_model(config, 8).state_dict(), 8, 0, "pcb"))
    return path


@pytest.fixture(scope="module")
def backends(tiny_config, tiny_root, milvus_db, tmp_path_factory):
    """One checkpoint, the tiny gallery split in Milvus Lite (with --meta timestamps: image i
    at 10:00 + i minutes) and in a FAISS folder (no timestamps)."""
    folder = tmp_path_factory.mktemp("galleries")
    config = tiny_config("attention.kind=none")
    checkpoint = untrained(config, folder / "last.pt", seed=0)
    rows = read_manifest(manifest_path(tiny_root, "tiny"))
    gallery = rows[rows["split"] == "gallery"].reset_index(drop=True)
    times = pd.date_range("2024-05-01T10:00", periods=len(gallery), freq="min")
    meta_csv = folder / "meta.csv"
    pd.DataFrame({"path": gallery["path"], "timestamp": times.strftime("%Y-%m-%dT%H:%M")}).to_csv(
        meta_csv, index=False
    )
    common = {"dataset": "tiny", "root": tiny_root, "progress": False}
    build_gallery_index(checkpoint, milvus_db, collection=COLLECTION, meta_csv=meta_csv, **common)
    index = build_gallery_index(checkpoint, folder / "index", **common).out
    return checkpoint, index, gallery


def test_evaluating_the_milvus_gallery_gives_the_in_memory_numbers(backends, tiny_root, milvus_db):
    checkpoint, index, gallery = backends
    memory = run_evaluation(checkpoint, "tiny", root=tiny_root, progress=False)
    for stored, collection in ((milvus_db, COLLECTION), (index, None)):
        report = run_evaluation(
            checkpoint, "tiny", root=tiny_root, gallery=stored, collection=collection,
            progress=False,
        )  # fmt: skip
        assert report.num_gallery == memory.num_gallery == len(gallery)
        np.testing.assert_array_equal(report.metrics.cmc, memory.metrics.cmc)
        assert report.metrics.mAP == memory.metrics.mAP
        assert report.metrics.mINP == memory.metrics.mINP
        assert report.chance_rank1 == memory.chance_rank1
        assert report.gallery is not None and report.as_dict()["gallery"] == report.gallery
    assert 0 < memory.metrics.mAP < 1  # a ranking with something to get right and wrong


def test_evaluate_refuses_a_gallery_of_other_weights(backends, tiny_config, tiny_root, milvus_db):
    checkpoint, index, _ = backends
    other = untrained(tiny_config("attention.kind=none"), checkpoint.parent / "other.pt", seed=1)
    for stored, collection in ((milvus_db, COLLECTION), (index, None)):
        with pytest.raises(GalleryModelError, match=f"holds features of {checkpoint}"):
            run_evaluation(
                other, "tiny", root=tiny_root, gallery=stored, collection=collection,
                progress=False,
            )  # fmt: skip
    with pytest.raises(GalleryModelError, match="feature g, flip off, not .*feature h"):
        run_evaluation(
            checkpoint, "tiny", root=tiny_root, gallery=index, feature="h", progress=False
        )


def test_extract_refuses_a_collection_of_another_model_and_keeps_it(
    backends, tiny_config, tiny_root, milvus_db
):
    checkpoint, _, gallery = backends
    other = untrained(tiny_config("attention.kind=none"), checkpoint.parent / "other2.pt", seed=2)
    with pytest.raises(MilvusError, match=f"collection {COLLECTION} .* holds the gallery of"):
        build_gallery_index(
            other, milvus_db, collection=COLLECTION, dataset="tiny", root=tiny_root,
            progress=False,
        )  # fmt: skip
    assert open_gallery(milvus_db, COLLECTION).ntotal == len(gallery)


def queries_of(tiny_root) -> list[Path]:
    rows = read_manifest(manifest_path(tiny_root, "tiny"))
    return [Path(p) for p in rows[rows["split"] == "query"]["path"]]


def matches(results) -> list[list[tuple[str, int]]]:
    return [[(m.path, m.camid) for m in result.matches] for result in results]


def test_a_camera_filter_gives_the_same_matches_on_both_backends(backends, tiny_root, milvus_db):
    _, index, gallery = backends
    queries = queries_of(tiny_root)[:2]
    where = GalleryFilter(cameras=(2,))
    folder = search_index(queries, index, top=30, where=where)
    milvus = search_index(queries, milvus_db, top=30, where=where, collection=COLLECTION)
    assert matches(folder) == matches(milvus)
    expected = int((gallery["camid"] == 2).sum())
    assert all(len(r.matches) == expected and {m.camid for m in r.matches} == {2} for r in folder)
    unfiltered = search_index(queries[:1], milvus_db, top=30, collection=COLLECTION)
    assert {m.camid for m in unfiltered[0].matches} == {1, 2}  # the filter did something


def test_timestamps_from_meta_filter_a_milvus_search(backends, tiny_root, milvus_db):
    _, index, gallery = backends
    where = GalleryFilter(
        after=parse_time("2024-05-01T10:05"), before=parse_time("2024-05-01T10:10")
    )
    (result,) = search_index(queries_of(tiny_root)[:1], milvus_db, top=30, where=where,
                             collection=COLLECTION)  # fmt: skip
    # images 5..9 were taken from 10:05 to 10:09 (before is exclusive)
    assert sorted(m.path for m in result.matches) == sorted(gallery["path"][5:10])
    with pytest.raises(GalleryFilterError, match=f"gallery {index} has no timestamp values"):
        search_index(queries_of(tiny_root)[:1], index, where=where)


def test_frames_from_market_names_filter_both_backends(backends, tiny_root, milvus_db):
    _, index, gallery = backends
    frames = gallery["path"].map(lambda p: int(Path(p).name.split("_")[2]))
    threshold = int(frames.median())
    where = GalleryFilter(after=parse_time(str(threshold)))
    query = queries_of(tiny_root)[:1]
    folder = search_index(query, index, top=30, where=where)
    milvus = search_index(query, milvus_db, top=30, where=where, collection=COLLECTION)
    assert matches(folder) == matches(milvus)
    expected = set(gallery["path"][frames >= threshold])
    assert {m.path for m in folder[0].matches} == expected and 0 < len(expected) < len(gallery)


def test_search_refuses_a_checkpoint_changed_since_extraction(backends, tiny_root, tmp_path):
    checkpoint, index, _ = backends
    copy = tmp_path / "index"
    import shutil

    shutil.copytree(index, copy)
    info = copy / "info.json"
    info.write_text(info.read_text().replace('"checkpoint_sha256": "', '"checkpoint_sha256": "0'))
    with pytest.raises(ReidkitError, match="has changed since .* was built from it"):
        search_index(queries_of(tiny_root)[:1], copy)
