"""Extraction and evaluation: embeddings as PCB defines them, the paper's row, index search."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.config import PaperRow, apply_overrides, load_preset
from reidkit.data.loading import build_loader, manifest_path, read_manifest
from reidkit.data.prepare import prepare_dataset
from reidkit.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from reidkit.engine.evaluate import Reference, paper_reference, run_evaluation
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


def test_synthetic_images_under_a_benchmarks_name_get_no_paper_row(
    tiny_checkpoint, tiny_spec, tmp_path: Path
):
    # the case: a 2-epoch ResNet-18 96x32 run of a paper preset on a set named cuhk03-np
    state = load_checkpoint(tiny_checkpoint)
    prepare_dataset("synthetic", tmp_path, name="cuhk03-np", synthetic=tiny_spec, progress=False)
    config = replace(
        state.config,
        name="pcb-csalr",
        data=replace(state.config.data, root=str(tmp_path), dataset="cuhk03-np"),
        paper=load_preset("pcb-csalr").paper,
    )
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(checkpoint, replace(state, config=config))
    results = tmp_path / "results.json"
    printed = CliRunner().invoke(
        app, ["evaluate", str(checkpoint), "--json", str(results)], env={"COLUMNS": None}
    )
    assert printed.exit_code == 0, printed.output
    assert "67.6" not in printed.stdout and "paper" not in printed.stdout  # no Table 1 row
    note = "cuhk03-np is a synthetic dataset, not an official benchmark"
    assert f"no reference row: {note}" in printed.stdout.splitlines()
    saved = json.loads(results.read_text())
    assert saved["dataset"] == "cuhk03-np"
    assert saved["paper"] is None and saved["paper_note"] == note


PCB_CSALR = load_preset("pcb-csalr")


def prepared(folder: Path, **record) -> Path:
    """A dataset folder with the dataset.json `prepare` would have written (no images needed:
    the reference reads only the record)."""
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(record))
    return folder


def test_the_presets_own_run_on_a_verified_official_dataset_gets_its_row(tmp_path: Path):
    market = prepared(tmp_path / "market1501", dataset="market1501", variant=None, verified=True)
    reference = paper_reference(PCB_CSALR, market, epoch=100)
    assert reference == Reference(PaperRow(93.9, 97.8, 98.6, 82.4))
    # tuning what the publication does not fix keeps the row (batch, rate, workers)
    tuned = apply_overrides(PCB_CSALR, ["train.batch_size=32", "train.lr=0.05"])
    assert paper_reference(tuned, market, epoch=100).row == reference.row
    # CUHK03-NP: the detected boxes are the paper's, under their own folder name
    cuhk = prepared(tmp_path / "cuhk", dataset="cuhk03-np", variant="detected", verified=True)
    on_cuhk = apply_overrides(PCB_CSALR, ["data.dataset=cuhk"])
    assert paper_reference(on_cuhk, cuhk).row == PaperRow(67.6, 82.4, 88.4, 64.0)


@pytest.mark.parametrize(
    ("record", "overrides", "options", "note"),
    [
        (
            {"dataset": "custom", "verified": False},
            (),
            {},
            "market1501 is a custom dataset, not an official benchmark",
        ),
        (None, (), {}, "market1501 is not prepared by reidkit, not an official benchmark"),
        (
            {"dataset": "market1501", "verified": False},  # --allow-mismatch
            (),
            {},
            "market1501's counts were not verified against the published ones",
        ),
        (
            {"dataset": "market1501", "verified": True},
            (
                "model.arch=resnet18",
                "data.height=96",
                "data.width=32",
                "attention.grid=3,2",
                "train.epochs=2",
            ),  # fmt: skip
            {},
            "the run differs from preset pcb-csalr: model.arch resnet18 (preset resnet50), "
            "attention.grid 3,2 (preset 12,8), data.height 96 (preset 384), data.width 32 "
            "(preset 128), train.epochs 2 (preset 100)",
        ),
        (
            {"dataset": "market1501", "verified": True},
            ("model.pretrained=false", "attention.kind=none"),
            {},
            "the run differs from preset pcb-csalr: model.pretrained false (preset true), "
            "attention.kind none (preset csalr)",
        ),
        (
            {"dataset": "market1501", "verified": True},
            ("attention.grid=6,4",),  # Table 2's 24 landmarks, not Table 1's 96
            {},
            "the run differs from preset pcb-csalr: attention.grid 6,4 (preset 12,8)",
        ),
        (
            {"dataset": "market1501", "verified": True},
            (),
            {"epoch": 40},
            "the checkpoint has trained 40 of its 100 epochs",
        ),
        (
            {"dataset": "market1501", "verified": True},
            (),
            {"rerank": True},
            "re-ranked: the published rows are without re-ranking",
        ),
        (
            {"dataset": "market1501", "verified": True},
            ("data.dataset=duke",),
            {},
            "trained on dukemtmc-reid, evaluated on market1501: the published rows train and "
            "test on one dataset",
        ),
    ],
    ids=[
        "custom",
        "no-record",
        "unverified",
        "arch-input-epochs",
        "init-attention",
        "ablation",
        "unfinished",
        "reranked",
        "cross-domain",
    ],  # fmt: skip
)
def test_no_reference_row_says_why(tmp_path: Path, record, overrides, options, note):
    folder = tmp_path / "market1501"
    if record is None:
        folder.mkdir()
    else:
        prepared(folder, **record)
    config = apply_overrides(PCB_CSALR, list(overrides))
    assert paper_reference(config, folder, **options) == Reference(None, note)


def test_a_preset_without_a_row_or_not_shipped_says_so(tmp_path: Path):
    labeled = prepared(
        tmp_path / "cuhk03-np-labeled", dataset="cuhk03-np", variant="labeled", verified=True
    )
    config = apply_overrides(PCB_CSALR, ["data.dataset=cuhk03-np-labeled"])
    assert paper_reference(config, labeled).note == (
        "preset pcb-csalr has no published row for cuhk03-np-labeled"
    )
    market = prepared(tmp_path / "market1501", dataset="market1501", verified=True)
    assert paper_reference(replace(PCB_CSALR, name="mine"), market).note == (
        "mine is not a shipped preset, so its settings cannot be checked"
    )
    assert paper_reference(load_preset("smoke"), market).note == (
        "preset smoke has no published numbers"
    )


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


def test_a_row_measured_with_another_recipe_is_named_as_an_anchor_not_shown(tmp_path: Path):
    # mobilenet-bot's rows are torchreid's (softmax, 256x128): even the preset's own finished
    # run on verified Market-1501 does not get them printed as its published row
    market = prepared(tmp_path / "market1501", dataset="market1501", variant=None, verified=True)
    config = load_preset("mobilenet-bot", ["data.dataset=market1501"])
    reference = paper_reference(config, market, epoch=config.train.epochs)
    assert reference.row is None
    assert reference.note == (
        "preset mobilenet-bot's market1501 row (torchreid model zoo, mobilenetv2_x1_0: R1 85.6 "
        "/ mAP 67.3) was measured with another recipe (ImageNet start, cross-entropy only, "
        "256x128): an anchor to read the run against, not the same measurement"
    )
