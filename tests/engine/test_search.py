"""Gallery index building: identities from file names, one clear source, the index kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
from reidkit.engine.search import build_gallery_index, folder_images
from reidkit.errors import DatasetError
from reidkit.models.net import build_model
from reidkit.retrieval.index import load_index_folder


def test_folder_images_give_no_identity_to_dated_or_dashed_names(tmp_path: Path):
    names = [
        "0007_c2s1_000001_00.jpg",
        "2024-01-15_c1_0001.jpg",
        "cam-_c2.png",
        "frame-12-3_c1.jpg",
        "holiday_2019_c1.jpg",
    ]
    for name in names:
        Image.new("RGB", (8, 16)).save(tmp_path / name)
    rows = folder_images(tmp_path)
    ids = {Path(p).name: (pid, camid) for p, pid, camid in rows[["path", "pid", "camid"]].values}
    assert ids == {
        "0007_c2s1_000001_00.jpg": (7, 2),
        # no crash on the dashes, and no pid read from the middle of a name
        "2024-01-15_c1_0001.jpg": (-1, -1),
        "cam-_c2.png": (-1, -1),
        "frame-12-3_c1.jpg": (-1, -1),
        "holiday_2019_c1.jpg": (-1, -1),
    }


def test_gallery_index_without_a_source_says_what_to_give(tmp_path: Path):
    with pytest.raises(DatasetError) as err:
        build_gallery_index(tmp_path / "last.pt", tmp_path / "index", progress=False)
    assert "give either --dataset NAME" in str(err.value) and "not both" not in str(err.value)


def test_gallery_index_with_two_sources_refuses_both(tmp_path: Path):
    with pytest.raises(DatasetError, match="not both"):
        build_gallery_index(
            tmp_path / "last.pt", tmp_path / "index", dataset="tiny", images=tmp_path
        )


def test_index_kind_defaults_to_the_checkpoints_eval_index(tiny_config, tmp_path: Path):
    config = tiny_config("eval.index=hnsw", "attention.kind=none")  # attention is not the point
    checkpoint = tmp_path / "last.pt"
    model = build_model(config, 8)
    save_checkpoint(checkpoint, Checkpoint(config, model.state_dict(), 8, 0, "pcb"))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 96), (40 * i, 80, 120)).save(pictures / f"000{i}_c1.jpg")
    folder = build_gallery_index(
        checkpoint, tmp_path / "index", images=pictures, progress=False
    ).out
    assert load_index_folder(folder).info["index_kind"] == "hnsw"  # not the old fixed "flat"
