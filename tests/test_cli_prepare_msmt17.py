"""`reidkit prepare msmt17` end to end: a V2 archive, the counts table, a missing archive."""

from __future__ import annotations

import io
import zipfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.data import datasets
from reidkit.data.datasets import PublishedCounts

runner = CliRunner()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (10, 120, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


def msmt17_v2_zip(path: Path) -> Path:
    """MSMT17_V2.zip: 3 training ids (train + val lists), 2 test ids, cameras 1-15."""
    data = jpeg()
    lists: dict[str, list[str]] = {
        name: []
        for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
    }
    plan = [
        ("list_train.txt", 0, 1),
        ("list_train.txt", 1, 9),
        ("list_val.txt", 2, 10),
        ("list_query.txt", 0, 13),
        ("list_gallery.txt", 0, 14),
        ("list_gallery.txt", 1, 15),
    ]
    with zipfile.ZipFile(path, "w") as zf:
        for index, (list_name, pid, camera) in enumerate(plan):
            folder = (
                "mask_test_v2"
                if list_name in ("list_query.txt", "list_gallery.txt")
                else ("mask_train_v2")
            )
            name = f"{pid:04d}/{pid:04d}_{index:03d}_{camera:02d}_0302noon_{index:04d}_0.jpg"
            zf.writestr(f"MSMT17_V2/{folder}/{name}", data)
            lists[list_name].append(f"{name} {pid}")
        for list_name, rows in lists.items():
            zf.writestr(f"MSMT17_V2/{list_name}", "\n".join(rows) + "\n")
    return path


def invoke(*args):
    result = runner.invoke(app, ["prepare", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def counts(monkeypatch):
    """Set the counts `prepare msmt17` verifies against."""

    def set_counts(value: PublishedCounts) -> None:
        spec = replace(datasets.LIST_DATASETS["msmt17"], counts=value)
        monkeypatch.setitem(datasets.LIST_DATASETS, "msmt17", spec)

    return set_counts


def test_v2_archive_in_root_is_verified_with_its_cameras(tmp_path, counts):
    counts(PublishedCounts(3, 3, 1, 1, 2, cameras=6))
    msmt17_v2_zip(tmp_path / "MSMT17_V2.zip")
    result = invoke("msmt", tmp_path)
    assert result.exit_code == 0, result.output
    assert "verified against the published counts" in result.stdout
    frame = pd.read_csv(tmp_path / "msmt17" / "manifest.csv")
    assert frame["camid"].tolist() == [1, 9, 10, 13, 14, 15]
    assert frame["split"].tolist() == ["train"] * 3 + ["query"] + ["gallery"] * 2
    assert frame["path"].iloc[2].startswith("MSMT17_V2/mask_train_v2/0002/")  # the val list


def test_count_mismatch_prints_the_table_and_allow_mismatch_accepts(tmp_path, counts):
    counts(PublishedCounts(3, 3, 1, 1, 2, cameras=15))
    archive = msmt17_v2_zip(tmp_path / "MSMT17_V2.zip")
    root = tmp_path / "root"
    result = invoke("msmt17", root, "--source", archive)
    assert result.exit_code == 1
    assert "counts: published vs found" in result.stderr and "cameras" in result.stderr
    (line,) = error_lines(result)
    assert "MSMT17 counts differ from the published ones: cameras 6 (published 15)" in line
    assert not root.exists() or not any(root.iterdir())
    accepted = invoke("msmt17", root, "--source", archive, "--allow-mismatch")
    assert accepted.exit_code == 0, accepted.output
    assert "accepted (--allow-mismatch)" in accepted.stderr
    assert "counts not verified" in accepted.stdout


def test_missing_archive_is_one_line_naming_the_files_to_place(tmp_path):
    result = invoke("msmt17", tmp_path)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert f"no MSMT17 in {tmp_path}: place MSMT17_V1.tar.gz or MSMT17_V2.zip" in line
    assert "on request" in line
    assert len(result.stderr.strip().splitlines()) == 1
