"""The Python API: embedding what the CLI embeds, every input kind, the index, the README."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import reidkit
from reidkit.api import GalleryIndex, load_model
from reidkit.cli import app
from reidkit.data.loading import build_loader, manifest_path, read_manifest
from reidkit.engine.checkpoint import load_model as load_checkpoint_model
from reidkit.engine.extract import extract_features
from reidkit.engine.search import search_index
from reidkit.errors import DatasetError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def gallery_rows(tiny_root):
    frame = read_manifest(manifest_path(tiny_root, "tiny"))
    return frame[frame["split"] == "gallery"].reset_index(drop=True)


def test_embed_gives_what_extract_gives_for_the_same_images(tiny_checkpoint, gallery_rows):
    net, state = load_checkpoint_model(tiny_checkpoint)
    loader = build_loader(gallery_rows, "gallery", state.config.data, batch_size=5, train=False)
    expected = extract_features(net, loader, progress=False)
    features = load_model(tiny_checkpoint, device="cpu").embed(gallery_rows["path"], batch_size=3)
    assert features.dtype == np.float32 and features.shape == expected.shape
    np.testing.assert_allclose(features, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)


def test_paths_images_and_arrays_embed_alike(tiny_checkpoint, gallery_rows):
    model = load_model(tiny_checkpoint, device="cpu")
    paths = list(gallery_rows["path"][:4])
    images = [Image.open(p).convert("RGB") for p in paths]
    arrays = [np.asarray(image) for image in images]
    by_path = model.embed(paths)
    np.testing.assert_allclose(model.embed(images), by_path, atol=1e-6)
    np.testing.assert_allclose(model.embed(arrays), by_path, atol=1e-6)
    np.testing.assert_allclose(model.embed(reversed(paths)), by_path[::-1], atol=1e-6)


def test_flip_averages_with_the_mirror_image(tiny_checkpoint, gallery_rows):
    model = load_model(tiny_checkpoint, device="cpu")
    image = np.array(Image.open(gallery_rows["path"][0]).convert("RGB"))
    image[:, : image.shape[1] // 3] = 0  # lopsided, so its mirror image looks different
    mirror = image[:, ::-1].copy()
    plain, flipped = model.embed([image])[0], model.embed([image], flip=True)[0]
    assert float(plain @ model.embed([mirror])[0]) < 1 - 1e-3  # the model tells them apart
    np.testing.assert_allclose(model.embed([mirror], flip=True)[0], flipped, atol=1e-5)
    assert float(plain @ flipped) < 1 - 1e-4  # flipping changed the feature


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (np.zeros((8, 4), dtype=np.uint8), r"\(H, W, 3\) uint8"),
        (np.zeros((8, 4, 3), dtype=np.float32), r"\(H, W, 3\) uint8"),
        (Path("/nowhere/missing.jpg"), "missing.jpg does not exist"),
        (3.5, "cannot embed a float"),
    ],
)
def test_bad_inputs_are_refused_in_one_line(tiny_checkpoint, item, message):
    with pytest.raises(DatasetError, match=message):
        load_model(tiny_checkpoint, device="cpu").embed([item])


def test_a_file_that_is_not_an_image_is_named(tiny_checkpoint, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(DatasetError, match="notes.jpg is not a readable image"):
        load_model(tiny_checkpoint, device="cpu").embed([bad])


def test_index_round_trip_is_what_search_reads(tiny_checkpoint, gallery_rows, tmp_path):
    model = load_model(tiny_checkpoint, device="cpu")
    paths = list(gallery_rows["path"])
    features = model.embed(paths)
    index = GalleryIndex.build(features, paths=paths, model=model)
    assert list(index.meta["pid"]) == list(gallery_rows["pid"])  # read from PID_cCAM names
    folder = index.save(tmp_path / "index")
    loaded = GalleryIndex.load(folder)
    scores, rows = loaded.search(features[:3], k=1)
    assert list(rows[:, 0]) == [0, 1, 2]  # every image finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    # the CLI's search reads the folder the API wrote, with the model it records
    (result,) = search_index([Path(paths[0])], folder, top=1)
    assert result.matches[0].path == paths[0]


def test_import_reidkit_does_not_load_torch():
    code = "import sys, reidkit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert reidkit.load_model is load_model


def test_readme_example_runs(tiny_checkpoint, tiny_root, tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # the layout `reidkit demo` leaves, with the tiny set and checkpoint standing in
    (tmp_path / "runs" / "demo" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "run" / "last.pt").symlink_to(tiny_checkpoint)
    (tmp_path / "runs" / "demo" / "data").mkdir()
    (tmp_path / "runs" / "demo" / "data" / "synthetic").symlink_to(tiny_root / "tiny")
    monkeypatch.chdir(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5 and all(re.fullmatch(r"-?\d\.\d{3}  \S+\.jpg", line) for line in lines)
    index = tmp_path / "runs" / "my-index"
    assert (index / "index.faiss").is_file()
    # the gallery was embedded with flip=True: the folder says so, for `search` to do the same
    assert json.loads((index / "info.json").read_text())["flip"] is True
    # the README's `reidkit search ... --index runs/my-index`, from another folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    query = sorted((tiny_root / "tiny" / "query").glob("*.jpg"))[0]
    searched = CliRunner().invoke(
        app, ["search", str(query), "--index", str(index), "--top", "3"], env={"COLUMNS": None}
    )
    assert searched.exit_code == 0, searched.output
    gallery = (tmp_path / "runs" / "demo" / "data" / "synthetic" / "bounding_box_test").resolve()
    rows = [line for line in searched.stdout.splitlines() if f"{gallery}/" in line]
    assert len(rows) == 3  # each ranked image by its absolute path
    assert (elsewhere / "ranked.png").is_file()


def test_a_gallery_records_the_flip_it_was_embedded_with(tiny_checkpoint, gallery_rows):
    paths = list(gallery_rows["path"][:3])
    model = load_model(tiny_checkpoint, device="cpu")
    assert model.config.eval.flip is False
    features = model.embed(paths, flip=True)
    assert GalleryIndex.build(features, paths=paths, model=model).info["flip"] is True
    assert GalleryIndex.build(features, paths=paths, model=model, flip=False).info["flip"] is False
    model.embed(paths[:1])  # now without flip too: which one the gallery used is not known
    with pytest.raises(DatasetError, match=r"pass GalleryIndex.build\(..., flip=True or False\)"):
        GalleryIndex.build(features, paths=paths, model=model)
    plain = load_model(tiny_checkpoint, device="cpu")
    plain.embed(paths)
    assert GalleryIndex.build(features, paths=paths, model=plain).info["flip"] is False


def test_relative_gallery_paths_are_stored_absolute(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_root)
    relative = [Path("tiny") / "query" / name for name in ("a.jpg", "b.jpg")]
    index = GalleryIndex.build(np.eye(2, dtype=np.float32), paths=relative)
    assert list(index.meta["path"]) == [str(tiny_root / p) for p in relative]
