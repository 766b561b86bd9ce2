"""`extract` and `search` on odd inputs: a pipe named like an image, an index saved without a
checkpoint, a disk that fills while the index is written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from reidkit.api import GalleryIndex
from reidkit.cli import app
from reidkit.engine.search import folder_images, search_index
from reidkit.errors import IndexFolderError
from reidkit.retrieval import index as index_module

runner = CliRunner()


def test_extract_images_picks_regular_files_only_never_a_pipe(tmp_path: Path):
    Image.new("RGB", (32, 96)).save(tmp_path / "0001_c1_a.jpg")
    os.mkfifo(tmp_path / "0002_c1_b.jpg")  # reading it would wait forever for a writer
    (tmp_path / "0003_c1_c.jpg").mkdir()  # a folder named like an image, too
    rows = folder_images(tmp_path)
    assert [Path(p).name for p in rows["path"]] == ["0001_c1_a.jpg"]


def test_search_on_an_index_saved_without_a_model_says_it_names_no_checkpoint(
    tiny_root: Path, tmp_path: Path
):
    GalleryIndex.build(np.eye(2, dtype=np.float32), paths=["a.jpg", "b.jpg"]).save(tmp_path / "i")
    query = sorted((tiny_root / "tiny" / "query").glob("*.jpg"))[0]
    with pytest.raises(IndexFolderError) as err:
        search_index([query], tmp_path / "i")
    message = str(err.value)
    assert f"{tmp_path / 'i'} names no checkpoint" in message
    assert "GalleryIndex.build(..., model=load_model(CHECKPOINT))" in message
    assert "is a folder" not in message


def test_a_full_disk_while_extract_writes_the_index_is_one_line_naming_the_folder(
    tiny_checkpoint: Path, tiny_root: Path, tmp_path: Path, monkeypatch
):
    def short_write(*args, **kwargs):
        raise OSError("233472 requested and 205792 written")  # what numpy says on a full disk

    monkeypatch.setattr(index_module.np, "save", short_write)
    out = tmp_path / "index"
    result = runner.invoke(
        app, ["extract", str(tiny_checkpoint), "--dataset", "tiny", "--out", str(out)]
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    # the first file written: a feature shard beside the index (OUT.shards), or the index
    assert lines[0].startswith(f"error: {out}"), lines[0]
    assert "No space left on device" in lines[0], lines[0]
    assert lines[0].endswith("free some disk space"), lines[0]
    assert list(tmp_path.iterdir()) == []  # no index, no temporary folder
