"""Index folders that would fail later are refused when they load: a meta.csv that is not
integers, no rows; an empty gallery is never built; the suggested rebuild is one that works."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reidkit.api import GalleryIndex
from reidkit.engine.search import check_index_out
from reidkit.errors import DatasetError, IndexFolderError
from reidkit.retrieval.index import build_index, load_index_folder


def saved_index(folder: Path, rows: int = 3) -> Path:
    features = np.eye(rows, 4, dtype=np.float32) + 0.1
    paths = [f"000{i}_c1_x.jpg" for i in range(rows)]
    return GalleryIndex.build(features, paths=paths).save(folder)


@pytest.mark.parametrize("value", ["abc", "1.5", "", "inf", "99999999999999999999"])
def test_a_meta_csv_pid_that_is_not_an_integer_is_refused_naming_the_line(tmp_path, value):
    folder = saved_index(tmp_path / "index")
    meta = pd.read_csv(folder / "meta.csv", dtype=str, keep_default_na=False)
    meta.loc[1, "pid"] = value
    meta.to_csv(folder / "meta.csv", index=False)
    with pytest.raises(IndexFolderError, match=f"meta.csv line 3: pid {value!r} is not an int"):
        load_index_folder(folder)


def test_an_empty_gallery_is_never_built(tmp_path):
    with pytest.raises(DatasetError, match="at least 1"):
        GalleryIndex.build(np.zeros((0, 4), np.float32))
    for kind in ("flat", "exact"):
        with pytest.raises(DatasetError, match=r"hold no values \(shape \(0, 4\)\)"):
            build_index(np.zeros((0, 4), np.float32), kind)


def test_an_index_folder_without_rows_is_refused_when_it_loads(tmp_path):
    folder = saved_index(tmp_path / "index", rows=1)
    # edited down to no rows, consistently: what an older reidkit could save
    info = json.loads((folder / "info.json").read_text())
    (folder / "info.json").write_text(json.dumps({**info, "num_rows": 0}))
    (folder / "meta.csv").write_text("path,pid,camid\n")
    np.save(folder / "features.npy", np.zeros((0, 4), np.float32))
    import faiss

    faiss.write_index(faiss.IndexFlatIP(4), str(folder / "index.faiss"))
    with pytest.raises(IndexFolderError, match="holds no gallery rows, so nothing to search"):
        load_index_folder(folder)


def suggested_out(message: str) -> Path:
    (out,) = re.findall(r"--out (\S+?)`", message)
    return Path(out)


@pytest.mark.parametrize("what", ["a folder of other files", "a file"])
def test_the_rebuild_command_suggested_for_a_non_index_is_one_extract_accepts(
    tmp_path, monkeypatch, what
):
    monkeypatch.chdir(tmp_path)
    given = tmp_path / "photos"
    if what == "a file":
        given.write_text("not an index")
    else:
        given.mkdir()
        (given / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(IndexFolderError) as err:
        GalleryIndex.load(given)
    out = suggested_out(str(err.value))
    check_index_out(out)  # extract would accept it: no refusal
    with pytest.raises(IndexFolderError):
        check_index_out(given)  # as it refuses the folder given
