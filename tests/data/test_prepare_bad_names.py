"""`prepare` on names and places it cannot use: a file name that is not UTF-8, ids beyond 64
bits or not finite, ROOT a file or read-only, a disk that fills; one line, nothing left."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from PIL import Image

from reidkit import outputs
from reidkit.data import prepare as prepare_module
from reidkit.data.datasets import read_table
from reidkit.data.prepare import prepare_dataset
from reidkit.errors import DatasetError, ReidkitError


def layout(folder: Path, extra: dict[str, str | bytes] | None = None) -> Path:
    """A tiny Market-style folder: 2 ids in train, query and gallery, 2 cameras."""
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (folder / split).mkdir(parents=True)
        for pid in (1, 2):
            for cam in (1, 2):
                name = f"{pid:04d}_c{cam}s1_000001_01.jpg"
                Image.new("RGB", (16, 32), (pid * 60, cam * 60, 90)).save(folder / split / name)
    for split, name in (extra or {}).items():
        target = os.path.join(os.fsencode(folder / split), os.fsencode(name))
        with open(target, "wb") as f:  # a name given as bytes may not be UTF-8
            Image.new("RGB", (16, 32)).save(f, format="JPEG")
    return folder


def test_a_file_name_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    source = layout(tmp_path / "src", {"query": b"0001_c1s1_\xff\xfe_01.jpg"})
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        prepare_dataset("custom", root, source=source, name="mine", progress=False)
    message = str(err.value)
    assert "0001_c1s1_\\xff\\xfe_01.jpg" in message and "is not valid UTF-8" in message
    message.encode("utf-8")  # printable: no undecodable bytes in the message itself
    assert not root.exists()  # no dataset.json without a manifest, no empty ROOT


@pytest.mark.parametrize(
    ("pid", "fragment"),
    [
        ("99999999999999999999", r"pid 99999999999999999999 is too large \(at most"),
        ("inf", "pid 'inf' is not an integer"),
        ("-inf", "pid '-inf' is not an integer"),
        ("nan", "pid 'nan' is not an integer"),
    ],
)
def test_a_csv_pid_that_is_infinite_or_beyond_64_bits_is_refused_naming_it(tmp_path, pid, fragment):
    csv = tmp_path / "people.csv"
    csv.write_text(f"path,pid,camid,split\na.jpg,1,0,query\nb.jpg,{pid},1,gallery\n")
    with pytest.raises(DatasetError, match=f"line 3: {fragment}"):
        read_table(csv)


def test_a_file_name_pid_beyond_64_bits_is_refused_at_prepare(tmp_path):
    source = layout(tmp_path / "src", {"bounding_box_test": "99999999999999999999_c1s1_x.jpg"})
    with pytest.raises(DatasetError, match="pid 99999999999999999999 is too large"):
        prepare_dataset("custom", tmp_path / "data", source=source, name="mine", progress=False)
    assert not (tmp_path / "data").exists()


def test_root_that_is_a_file_is_named_as_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(DatasetError, match=f"ROOT {notes} is a file, not a folder"):
        prepare_dataset("synthetic", notes, progress=False)
    assert notes.read_text() == "mine"


def test_a_read_only_root_is_named_not_the_staging_folder(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):  # what a read-only file system answers
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(outputs, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(
        prepare_module.tempfile,
        "mkdtemp",
        lambda **kw: read_only(Path(kw["dir"]) / f"{kw['prefix']}x1y2{kw['suffix']}"),
    )
    with pytest.raises(ReidkitError) as err:
        prepare_dataset("synthetic", tmp_path, progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot write ROOT {tmp_path / 'synthetic'}: ")
    assert "Read-only file system" in message and ".partial" not in message


def test_a_full_disk_while_generating_names_the_dataset_and_leaves_no_folder(tmp_path, monkeypatch):
    def full_disk(spec, folder, **kwargs):
        (folder / "query").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")  # PIL names no file

    monkeypatch.setattr(prepare_module, "generate_synthetic", full_disk)
    root = tmp_path / "new" / "data"
    with pytest.raises(DatasetError) as err:
        prepare_dataset("synthetic", root, progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot prepare {root / 'synthetic'}: No space left on device")
    assert "free some disk space" in message
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone, staging too
