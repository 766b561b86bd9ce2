"""Every command and the Python API on MobileNetV2 checkpoints, without and with attention.

Two runs trained once through `reidkit train` from the shared ImageNet file, one epoch on
the tiny synthetic set: `mobilenet-bot` (global head, no attention) at 64x32 and
`mobilenet-pcb-csalr` (six stripes, CSALR after stages 1-3) at 96x32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reidkit import GalleryIndex, load_model
from reidkit.cli import app
from reidkit.data.loading import build_transform, manifest_path, read_manifest
from reidkit.engine.checkpoint import load_checkpoint

runner = CliRunner()

# 64x32 keeps 4 rows at 1/16, enough for a global head; PCB's six stripes need 96 rows, where
# the 24x8 / 12x4 / 6x2 maps after stages 1-3 take a 3x2 landmark grid.
RUNS = {
    "bot": ("mobilenet-bot", ["data.height=64", "data.width=32", "data.pad_crop=2"]),
    "pcb-csalr": ("mobilenet-pcb-csalr", ["data.height=96", "data.width=32", "attention.grid=3,2"]),
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, fragment: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def runs(tiny_root, mobilenet_weights, tmp_path_factory) -> dict[str, Path]:
    """Run folders trained through the CLI from the ImageNet file (trained once per module)."""
    top = tmp_path_factory.mktemp("mobilenet")
    folders = {}
    for name, (preset, sizes) in RUNS.items():
        sets = [
            "data.dataset=tiny",
            f"data.root={tiny_root}",
            "data.workers=0",
            f"model.weights={mobilenet_weights}",
            "train.epochs=1",
            "train.batch_size=8",
            "train.eval_every=1",
            "eval.batch_size=16",
            *sizes,
        ]
        out = top / name
        trained = invoke("train", "--preset", preset, "--out", out,
                         *[arg for item in sets for arg in ("--set", item)])  # fmt: skip
        assert trained.exit_code == 0, trained.output
        folders[name] = out
    return folders


@pytest.fixture(scope="module")
def crops(cuhk03_subset) -> list[Path]:
    """Real query crops of the shared subset, read in place."""
    return sorted((cuhk03_subset / "query").glob("*.jpg"))[:6]


def test_train_writes_epoch_rows_with_cpu_time_gates_and_minp(runs, mobilenet_weights):
    for name, folder in runs.items():
        metrics = pd.read_csv(folder / "metrics.csv")
        assert metrics["cpu_seconds"].iloc[0] > 0
        assert {"rank1", "mAP", "mINP"} <= set(metrics.columns)
        assert 0 < metrics["mINP"].iloc[0] <= 1
        gates = sorted(c for c in metrics.columns if c.startswith("alpha_stage"))
        assert gates == ([] if name == "bot" else ["alpha_stage1", "alpha_stage2", "alpha_stage3"])
        state = load_checkpoint(folder / "last.pt")
        assert state.config.model.arch == "mobilenet_v2"
        assert state.config.model.weights == str(mobilenet_weights)
        # the run started from the ImageNet file: one epoch later its trunk is still that one
        shared = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
        for key in ("features.0.0.weight", "features.17.conv.6.weight"):
            trained, imagenet = state.model[f"trunk.{key}"].flatten(), shared[key].flatten()
            assert torch.nn.functional.cosine_similarity(trained, imagenet, dim=0) > 0.95, key
    # the gate starts at 0 and moved in the epoch: its mean over the steps is not 0
    csalr = pd.read_csv(runs["pcb-csalr"] / "metrics.csv")
    assert (csalr[["alpha_stage1", "alpha_stage2", "alpha_stage3"]].abs() > 0).all(axis=None)


def test_evaluate_extract_and_search_read_widths_from_the_trunk(runs, tiny_root, tmp_path):
    frame = read_manifest(manifest_path(tiny_root, "tiny"))
    query = frame[frame["split"] == "query"]["path"].iloc[0]
    # bot tests the 1280-d feature after BNNeck; PCB the six pooled 1280-d stripes
    for name, width in (("bot", 1280), ("pcb-csalr", 6 * 1280)):
        checkpoint = runs[name] / "last.pt"
        report = tmp_path / f"{name}.json"
        evaluated = invoke("evaluate", checkpoint, "--json", report)
        assert evaluated.exit_code == 0, evaluated.output
        numbers = json.loads(report.read_text())
        assert numbers["dataset"] == "tiny" and numbers["paper"] is None
        assert "mINP" in evaluated.stdout and 0 <= numbers["mAP"] <= 100
        index = tmp_path / f"{name}-index"
        extracted = invoke("extract", checkpoint, "--dataset", "tiny", "--out", index)
        assert extracted.exit_code == 0, extracted.output
        assert np.load(index / "features.npy").shape[1] == width
        montage = tmp_path / f"{name}-ranked.png"
        searched = invoke("search", query, "--index", index, "--top", "3", "--save", montage)
        assert searched.exit_code == 0, searched.output
        assert Path(query).name in searched.stdout and montage.is_file()


def test_export_matches_pytorch_on_real_crops(runs, crops, tmp_path):
    """The trunk's own graph (inverted residuals, ReLU6, depthwise convs) through the global
    head. One MobileNetV2 export costs about 8 CPU seconds, and CSALR's unrolled solve three
    times that, so the attention modules' export is held to the same bar once, on ResNet, in
    tests/engine/test_export.py."""
    onnxruntime = pytest.importorskip("onnxruntime")
    checkpoint, out = runs["bot"] / "last.pt", tmp_path / "model.onnx"
    result = invoke("export", checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    assert "worst cosine" in result.stdout
    model = load_model(checkpoint)
    transform = build_transform(*model.input_size, train=False)
    images = []
    for path in crops:
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"images": torch.stack(images).numpy()})
    expected = model.embed(crops, flip=False)
    assert exported.shape == expected.shape == (len(crops), 1280)
    cosines = (exported * expected).sum(1) / np.linalg.norm(exported, axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_attention_maps_of_the_narrow_stage_and_refusal_without_modules(runs, crops, tmp_path):
    out = tmp_path / "maps.png"
    checkpoint = runs["pcb-csalr"] / "last.pt"
    result = invoke("attention", checkpoint, crops[0], "--stage", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert "after stage 1" in result.stdout
    with Image.open(out) as png:
        assert png.format == "PNG"
    refused = invoke("attention", runs["bot"] / "last.pt", crops[0], "--out", tmp_path / "x.png")
    one_line_error(refused, "has no attention modules")


def test_compare_sets_both_runs_side_by_side(runs, tmp_path):
    prefix = tmp_path / "table"
    result = invoke("compare", runs["bot"], runs["pcb-csalr"], "--out", prefix)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(prefix.with_name("table.csv"))
    assert list(frame["run"]) == ["bot", "pcb-csalr"]
    assert list(frame["preset"]) == ["mobilenet-bot", "mobilenet-pcb-csalr"]


def test_python_api_embeds_real_crops_and_finds_them_again(runs, crops):
    for name, width in (("bot", 1280), ("pcb-csalr", 6 * 1280)):
        model = load_model(runs[name] / "last.pt")
        features = model.embed(crops)
        assert features.shape == (len(crops), width) and features.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
        index = GalleryIndex.build(features, paths=crops, model=model)
        _scores, rows = index.search(features, k=1)
        assert rows[:, 0].tolist() == list(range(len(crops)))


def test_a_weight_file_that_does_not_fit_stops_train_in_one_line(tiny_root, tmp_path):
    bad = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    sets = ["data.dataset=tiny", f"data.root={tiny_root}", f"model.weights={bad}"]
    result = invoke("train", "--preset", "mobilenet-bot", "--out", tmp_path / "run",
                    *[arg for item in sets for arg in ("--set", item)])  # fmt: skip
    one_line_error(result, "does not fit mobilenet_v2: missing 260 key(s): features.0.0.weight")
