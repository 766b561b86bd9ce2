"""Extraction and evaluation: embeddings as PCB defines them, the paper's row, index search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from reidkit.data.loading import build_loader, manifest_path, read_manifest
from reidkit.data.prepare import prepare_dataset
from reidkit.engine.checkpoint import load_model
from reidkit.engine.evaluate import evaluate_model, run_evaluation
from reidkit.engine.extract import extract_features
from reidkit.engine.search import build_gallery_index, folder_images, search_index
from reidkit.errors import DatasetError, IndexFolderError
from reidkit.retrieval.metrics import cmc_map, distance_matrix
from reidkit.retrieval.rerank import k_reciprocal_rerank_features


def tiny_split(root: Path, split: str) -> pd.DataFrame:
    frame = read_manifest(manifest_path(root, "tiny"))
    return frame[frame["split"] == split].reset_index(drop=True)


def test_embedding_is_unit_length_parts_concatenated(tiny_checkpoint, tiny_root):
    model, state = load_model(tiny_checkpoint)
    rows = tiny_split(tiny_root, "query")
    loader = build_loader(rows, "query", state.config.data, batch_size=3, train=False)
    features = extract_features(model, loader, feature="g", progress=False)
    parts = state.config.model.parts
    channels = model.trunk.out_channels[-1]
    assert features.shape == (len(rows), parts * channels)
    assert features.dtype == np.float32
    # each part was normalised before the concatenation was: every part has norm 1/sqrt(P)
    norms = np.linalg.norm(features.reshape(len(rows), parts, channels), axis=-1)
    np.testing.assert_allclose(norms, 1 / np.sqrt(parts), rtol=1e-5)
    reduced = extract_features(model, loader, feature="h", progress=False)
    assert reduced.shape == (len(rows), parts * state.config.model.reduced)


def test_flip_averages_the_part_vectors_of_both_views(tiny_checkpoint, tiny_root):
    model, state = load_model(tiny_checkpoint)
    rows = tiny_split(tiny_root, "query")
    loader = build_loader(rows, "query", state.config.data, batch_size=8, train=False)
    flipped = extract_features(model, loader, flip=True, progress=False)
    images = torch.cat([batch[0] for batch in loader])
    with torch.inference_mode():
        parts = model(images).part_features + model(images.flip(-1)).part_features  # (N, P, C)
    expected = F.normalize(F.normalize(parts, dim=-1).flatten(1), dim=-1)
    np.testing.assert_allclose(flipped, expected.numpy(), atol=1e-5)


def test_evaluation_scores_the_ranking_of_the_extracted_features(
    tiny_checkpoint, tiny_root, tiny_spec
):
    report = run_evaluation(tiny_checkpoint, "tiny", progress=False)
    spec = tiny_spec
    assert report.num_query == spec.test_ids * spec.query_cameras
    assert report.num_gallery == spec.counts().gallery_images
    # the same numbers from the features by hand: evaluation adds nothing of its own
    model, state = load_model(tiny_checkpoint)
    query, gallery = tiny_split(tiny_root, "query"), tiny_split(tiny_root, "gallery")
    features = [
        extract_features(
            model,
            build_loader(rows, split, state.config.data, batch_size=16, train=False),
            progress=False,
        )
        for rows, split in ((query, "query"), (gallery, "gallery"))
    ]
    expected = cmc_map(
        distance_matrix(*features),
        query["pid"].to_numpy(),
        gallery["pid"].to_numpy(),
        query["camid"].to_numpy(),
        gallery["camid"].to_numpy(),
        max_rank=report.metrics.cmc.shape[0],
    )
    np.testing.assert_allclose(report.metrics.cmc, expected.cmc)
    assert report.metrics.mAP == pytest.approx(expected.mAP)
    assert report.paper is None  # no paper row for a custom dataset
    official = run_evaluation(tiny_checkpoint, "tiny", ap_mode="official", progress=False)
    assert official.metrics.ap_mode == "official"
    assert official.metrics.mAP <= report.metrics.mAP + 1e-9  # the trapezoid never reads higher


def test_paper_row_is_found_for_a_paper_dataset_under_its_short_name(
    tiny_checkpoint, tiny_spec, tmp_path: Path
):
    model, state = load_model(tiny_checkpoint)
    # the tiny synthetic images prepared under Market-1501's folder name
    prepare_dataset("synthetic", tmp_path, name="market1501", synthetic=tiny_spec, progress=False)
    from dataclasses import replace

    from reidkit.config import PaperRow

    config = replace(
        state.config,
        data=replace(state.config.data, root=str(tmp_path)),
        paper={"market1501": PaperRow(93.9, 97.8, 98.6, 82.4)},
    )
    report = evaluate_model(model, config, dataset="market", progress=False)
    assert report.dataset == "market1501"
    assert report.paper == PaperRow(93.9, 97.8, 98.6, 82.4)


def test_gallery_index_search_agrees_with_the_distance_ranking(
    tiny_checkpoint, tiny_root, tmp_path: Path
):
    index = build_gallery_index(
        tiny_checkpoint, tmp_path / "index", dataset="tiny", progress=False
    ).out
    assert sorted(p.name for p in index.iterdir()) == [
        ".reidkit-index",  # the marker that lets a later extract replace it
        "features.npy",
        "index.faiss",
        "info.json",
        "meta.csv",
    ]
    query = tiny_split(tiny_root, "query")
    gallery = tiny_split(tiny_root, "gallery")
    results = search_index([Path(p) for p in query["path"]], index, top=5)
    gallery_features = np.load(index / "features.npy")
    model, state = load_model(tiny_checkpoint)
    query_features = extract_features(
        model,
        build_loader(query, "query", state.config.data, batch_size=16, train=False),
        progress=False,
    )
    order = np.argsort(distance_matrix(query_features, gallery_features), axis=1, kind="stable")
    for result, expected, pid in zip(results, order, query["pid"], strict=True):
        assert [m.path for m in result.matches] == list(gallery["path"].iloc[expected[:5]])
        assert result.query_pid == pid
        assert [m.rank for m in result.matches] == [1, 2, 3, 4, 5]
        scores = [m.score for m in result.matches]
        assert scores == sorted(scores, reverse=True)


def test_folder_images_read_ids_from_market_names_and_mark_others_unknown(tmp_path: Path):
    from PIL import Image

    for name in ("0007_c2s1_000001_00.jpg", "holiday.png", "notes.txt"):
        target = tmp_path / "pics" / name
        target.parent.mkdir(exist_ok=True)
        if name.endswith("txt"):
            target.write_text("not an image")
        else:
            Image.new("RGB", (8, 16)).save(target)
    rows = folder_images(tmp_path / "pics")
    assert list(rows["pid"]) == [7, -1] and list(rows["camid"]) == [2, -1]
    with pytest.raises(DatasetError, match="does not exist"):
        folder_images(tmp_path / "nowhere")


def test_search_without_an_index_says_how_to_build_one(tmp_path: Path):
    with pytest.raises(IndexFolderError, match="build one with `reidkit extract"):
        search_index([tmp_path / "q.jpg"], tmp_path / "missing")


def test_index_needs_exactly_one_source(tiny_checkpoint, tmp_path: Path):
    with pytest.raises(DatasetError, match="either --dataset"):
        build_gallery_index(tiny_checkpoint, tmp_path / "i", progress=False)


def test_rerank_scores_the_re_ranked_distances_of_the_extracted_features(
    tiny_checkpoint, tiny_root
):
    reranked = run_evaluation(tiny_checkpoint, "tiny", rerank=True, progress=False)
    assert reranked.rerank
    # the same features by hand, ranked by k-reciprocal re-ranking and by plain cosine distance
    model, state = load_model(tiny_checkpoint)
    query, gallery = tiny_split(tiny_root, "query"), tiny_split(tiny_root, "gallery")
    q_feats, g_feats = (
        extract_features(
            model,
            build_loader(rows, split, state.config.data, batch_size=16, train=False),
            progress=False,
        )
        for rows, split in ((query, "query"), (gallery, "gallery"))
    )
    ids = (query["pid"], gallery["pid"], query["camid"], gallery["camid"])
    ids = tuple(column.to_numpy() for column in ids)
    max_rank = reranked.metrics.cmc.shape[0]
    expected = cmc_map(k_reciprocal_rerank_features(q_feats, g_feats), *ids, max_rank=max_rank)
    plain = cmc_map(distance_matrix(q_feats, g_feats, "cosine"), *ids, max_rank=max_rank)
    np.testing.assert_allclose(reranked.metrics.cmc, expected.cmc)
    assert reranked.metrics.mAP == pytest.approx(expected.mAP)
    assert reranked.metrics.mINP == pytest.approx(expected.mINP)
    # re-ranking moves this ranking, so a report that ignored it would not match
    assert abs(expected.mAP - plain.mAP) > 1e-3
