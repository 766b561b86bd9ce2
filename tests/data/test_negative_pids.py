"""Pids below -1 mean nothing in any dataset: refused with the file and the row, in a CSV, a
folder layout and a list file alike; -1 (junk) is still dropped."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.data.datasets import read_manifest
from reidkit.data.prepare import prepare_dataset
from reidkit.errors import DatasetError

RULE = "is negative; pids are 0 or more, and only -1 has a meaning"


def csv_dataset(tmp_path: Path, helpers, pids: list[int]) -> Path:
    """A custom CSV of one image per pid: the first two rows query, the rest gallery."""
    lines = ["path,pid,camid,split"]
    for i, pid in enumerate(pids):
        name = f"img{i}.jpg"
        (tmp_path / name).write_bytes(helpers.tiny_image())
        lines.append(f"{name},{pid},{i % 2},{'query' if i < 2 else 'gallery'}")
    csv = tmp_path / "people.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_a_csv_pid_below_minus_one_is_refused_naming_the_file_and_line(tmp_path, helpers):
    csv = csv_dataset(tmp_path, helpers, [1, 2, 1, -2, 2])
    result = CliRunner().invoke(
        app, ["prepare", "custom", str(tmp_path / "root"), "--source", str(csv)]
    )
    assert result.exit_code == 1, result.output
    (line,) = [text for text in result.stderr.splitlines() if text.strip()]
    assert line.startswith("error:") and f"{csv} line 5: pid -2 {RULE}" in line
    assert not (tmp_path / "root" / "custom" / "manifest.csv").exists()


def test_junk_rows_are_still_dropped(tmp_path, helpers):
    csv = csv_dataset(tmp_path, helpers, [1, 2, 1, -1, 2])
    prepared = prepare_dataset("custom", tmp_path / "root", source=csv, progress=False)
    assert sorted(read_manifest(prepared.manifest)["pid"]) == [1, 1, 2, 2]


def test_a_written_manifest_with_such_a_pid_is_refused(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,pid,camid,split\na.jpg,3,1,query\nb.jpg,-7,2,gallery\n")
    with pytest.raises(DatasetError, match=f"line 3: pid -7 {RULE}"):
        read_manifest(manifest)


def test_a_file_name_with_such_a_pid_is_refused_naming_the_file(tmp_path, helpers):
    entries = helpers.small_market()
    entries["Market-1501-v15.09.15/bounding_box_test/-3_c1s1_000002_01.jpg"] = helpers.tiny_image()
    helpers.write_tree(tmp_path, entries)
    source = tmp_path / "Market-1501-v15.09.15"
    with pytest.raises(DatasetError) as err:
        prepare_dataset("custom", tmp_path / "root", source=source, progress=False)
    assert f"{source / 'bounding_box_test' / '-3_c1s1_000002_01.jpg'}: pid -3 {RULE}" in str(
        err.value
    )


def test_a_list_file_pid_below_minus_one_is_refused_naming_the_line(tmp_path, helpers):
    top = tmp_path / "MSMT17_V1"
    lists = {
        "list_train.txt": ("train", "0000/0000_000_01_0303morning_0001_0.jpg 0"),
        "list_val.txt": ("train", "0000/0000_001_02_0303morning_0002_0.jpg 0"),
        "list_query.txt": ("test", "0000/0000_002_03_0303morning_0003_0.jpg 0"),
        "list_gallery.txt": ("test", "0000/0000_003_04_0303morning_0004_0.jpg -5"),
    }
    entries = {}
    for name, (folder, line) in lists.items():
        entries[f"{folder}/{line.split()[0]}"] = helpers.tiny_image()
        entries[name] = (line + "\n").encode()
    helpers.write_tree(top, entries)
    with pytest.raises(DatasetError) as err:
        prepare_dataset(
            "msmt17", tmp_path / "root", source=top, allow_mismatch=True, progress=False
        )
    assert f"list_gallery.txt line 1: pid -5 {RULE}" in str(err.value)
