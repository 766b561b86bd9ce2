"""`prepare msmt17`: V1 and V2 layouts from archives and folders, list files, cameras, counts."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from reidkit.data import datasets
from reidkit.data.datasets import PublishedCounts, read_manifest
from reidkit.data.prepare import CountMismatchError, prepare_dataset
from reidkit.errors import DatasetError

IMAGE_FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
# (list file, pid, camera): two training identities whose val images come from the same
# train/ folder, and test pids that start again at 0, as MSMT17's do. Cameras up to 15.
IMAGES = [
    ("list_train.txt", 0, 1),
    ("list_train.txt", 1, 3),
    ("list_val.txt", 0, 12),
    ("list_val.txt", 1, 15),
    ("list_query.txt", 0, 10),
    ("list_query.txt", 1, 2),
    ("list_gallery.txt", 0, 11),
    ("list_gallery.txt", 0, 10),
    ("list_gallery.txt", 1, 5),
    ("list_gallery.txt", 2, 14),
]
# What a manifest of IMAGES holds: train 2 ids / 4 images, query 2 / 2, gallery 4 images,
# cameras {1, 2, 3, 5, 10, 11, 12, 14, 15}.
SMALL_COUNTS = PublishedCounts(2, 4, 2, 2, 4, cameras=9)


def msmt17_name(pid: int, index: int, camera: int) -> str:
    return f"{pid:04d}/{pid:04d}_{index:03d}_{camera:02d}_0303morning_{index:04d}_0.jpg"


def small_msmt17(helpers, release: str = "MSMT17_V1", top: str | None = None, lines=None):
    """Archive entries of a tiny MSMT17 release: image folders and the four list files."""
    train, test = IMAGE_FOLDERS[release]
    top = release if top is None else top
    entries, lists = {}, {name: [] for name in ("list_train.txt", "list_val.txt")}
    lists |= {"list_query.txt": [], "list_gallery.txt": []}
    for index, (list_name, pid, camera) in enumerate(IMAGES):
        folder = train if list_name in ("list_train.txt", "list_val.txt") else test
        name = msmt17_name(pid, index, camera)
        entries[f"{top}/{folder}/{name}"] = helpers.tiny_image()
        lists[list_name].append(f"{name} {pid}")
    for list_name, extra in (lines or {}).items():
        lists[list_name].append(extra)
    for list_name, rows in lists.items():
        entries[f"{top}/{list_name}"] = ("\n".join(rows) + "\n").encode()
    return entries


def prepare(root, **kw):
    return prepare_dataset("msmt17", root, progress=False, **kw)


@pytest.fixture
def small_counts(monkeypatch):
    """Verify against SMALL_COUNTS instead of MSMT17's published 126,441 images."""
    spec = replace(datasets.LIST_DATASETS["msmt17"], counts=SMALL_COUNTS)
    monkeypatch.setitem(datasets.LIST_DATASETS, "msmt17", spec)


def manifest_rows(result) -> list[tuple[str, int, int, str]]:
    frame = pd.read_csv(result.manifest)
    return list(frame.itertuples(index=False, name=None))


def test_v1_archive_in_root_gives_list_pids_and_name_cameras(tmp_path, helpers, small_counts):
    root = tmp_path / "root"
    root.mkdir()
    helpers.build_archive(root / "MSMT17_V1.tar.gz", small_msmt17(helpers))
    result = prepare(root)
    assert result.verified and result.name == "msmt17"
    train = "MSMT17_V1/train/"
    rows = manifest_rows(result)
    # the training split is list_train.txt then list_val.txt, both from train/
    assert rows[:4] == [
        (train + msmt17_name(0, 0, 1), 0, 1, "train"),
        (train + msmt17_name(1, 1, 3), 1, 3, "train"),
        (train + msmt17_name(0, 2, 12), 0, 12, "train"),
        (train + msmt17_name(1, 3, 15), 1, 15, "train"),
    ]
    assert rows[4] == ("MSMT17_V1/test/" + msmt17_name(0, 4, 10), 0, 10, "query")
    assert [r[3] for r in rows] == ["train"] * 4 + ["query"] * 2 + ["gallery"] * 4
    assert sorted({r[2] for r in rows}) == [1, 2, 3, 5, 10, 11, 12, 14, 15]
    assert [(s.split, s.ids, s.images) for s in result.splits] == [
        ("train", 2, 4),
        ("query", 2, 2),
        ("gallery", 3, 4),
    ]
    assert (root / "msmt17" / "MSMT17_V1" / "list_val.txt").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left


def test_v2_zip_source_reads_the_mask_folders(tmp_path, helpers, small_counts):
    archive = helpers.build_archive(tmp_path / "MSMT17_V2.zip", small_msmt17(helpers, "MSMT17_V2"))
    result = prepare(tmp_path / "root", source=archive)
    frame = read_manifest(result.manifest)
    folder = tmp_path / "root" / "msmt17" / "MSMT17_V2"
    assert frame["path"].iloc[0] == str(folder / "mask_train_v2" / msmt17_name(0, 0, 1))
    assert frame["path"].iloc[-1] == str(folder / "mask_test_v2" / msmt17_name(2, 9, 14))
    assert frame["camid"].tolist() == [c for _, _, c in IMAGES]
    assert result.verified


def test_folder_source_is_read_in_place_even_with_upper_case_v2_folders(
    tmp_path, helpers, small_counts
):
    entries = {
        k.replace("mask_train_v2", "mask_train_V2"): v
        for k, v in small_msmt17(helpers, "MSMT17_V2", top="downloads/MSMT17").items()
    }
    helpers.write_tree(tmp_path, entries)
    source = tmp_path / "downloads" / "MSMT17"
    result = prepare(tmp_path / "root", source=source)
    assert helpers.tree_files(tmp_path / "root") == {
        "msmt17",
        "msmt17/manifest.csv",
        "msmt17/dataset.json",
    }
    frame = read_manifest(result.manifest)
    assert frame["path"].iloc[0] == str(source / "mask_train_V2" / msmt17_name(0, 0, 1))


def test_torchreid_layout_root_msmt17_release_folder_is_found(tmp_path, helpers, small_counts):
    # torchreid reads ROOT/msmt17/MSMT17_V1/: that is ROOT/NAME here, so paths stay relative
    helpers.write_tree(tmp_path / "msmt17", small_msmt17(helpers))
    result = prepare(tmp_path)
    assert manifest_rows(result)[0][0] == "MSMT17_V1/train/" + msmt17_name(0, 0, 1)


def test_count_mismatch_shows_every_count_and_leaves_nothing(tmp_path, helpers, monkeypatch):
    counts = replace(SMALL_COUNTS, train_images=5, cameras=15)
    spec = replace(datasets.LIST_DATASETS["msmt17"], counts=counts)
    monkeypatch.setitem(datasets.LIST_DATASETS, "msmt17", spec)
    root = tmp_path / "root"
    root.mkdir()
    helpers.build_archive(root / "MSMT17_V1.tar", small_msmt17(helpers))
    with pytest.raises(CountMismatchError) as err:
        prepare(root)
    rows = {what: (published, found) for what, published, found in err.value.rows}
    assert rows["train images"] == (5, 4) and rows["cameras"] == (15, 9)
    assert rows["gallery images"] == (4, 4)
    assert "MSMT17 counts differ" in str(err.value) and "--allow-mismatch" in str(err.value)
    assert helpers.tree_files(root) == {"MSMT17_V1.tar"}  # extracted nothing into ROOT
    result = prepare(root, allow_mismatch=True)
    assert not result.verified and result.manifest.is_file()
    assert any("accepted (--allow-mismatch)" in w for w in result.warnings)


def test_published_counts_are_checked_by_default(tmp_path, helpers):
    helpers.write_tree(tmp_path, small_msmt17(helpers))
    with pytest.raises(CountMismatchError) as err:
        prepare(tmp_path / "root", source=tmp_path / "MSMT17_V1")
    rows = {what: published for what, published, _ in err.value.rows}
    assert (rows["train identities"], rows["train images"]) == (1_041, 32_621)
    assert (rows["query identities"], rows["query images"]) == (3_060, 11_659)
    assert (rows["gallery images"], rows["cameras"]) == (82_161, 15)


def test_rerun_reuses_the_manifest(tmp_path, helpers, small_counts):
    root = tmp_path / "root"
    root.mkdir()
    helpers.build_archive(root / "MSMT17_V2.zip", small_msmt17(helpers, "MSMT17_V2"))
    first = prepare(root)
    (root / "MSMT17_V2.zip").unlink()
    again = prepare(root)
    assert again.reused and again.verified and again.splits == first.splits


def test_missing_archive_names_both_releases_and_where_to_put_them(tmp_path):
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path)
    message = str(err.value)
    assert f"no MSMT17 in {tmp_path}: place MSMT17_V1.tar.gz or MSMT17_V2.zip" in message
    assert "MSMT17_V1/ or MSMT17_V2/" in message and "on request" in message
    assert "\n" not in message


def test_both_releases_in_root_ask_for_a_source(tmp_path, helpers):
    helpers.write_tree(tmp_path, small_msmt17(helpers))
    helpers.build_archive(tmp_path / "MSMT17_V2.zip", small_msmt17(helpers, "MSMT17_V2"))
    with pytest.raises(DatasetError, match="holds MSMT17_V1 and MSMT17_V2.zip; pass --source"):
        prepare(tmp_path)


def test_unsafe_archive_is_refused_and_nothing_is_written(tmp_path, helpers):
    entries = {**small_msmt17(helpers), "MSMT17_V1/../../evil.txt": b"x"}
    archive = helpers.build_archive(tmp_path / "MSMT17_V1.tar", entries)
    with pytest.raises(DatasetError, match="refusing to extract"):
        prepare(tmp_path / "root", source=archive)
    assert helpers.tree_files(tmp_path) == {"MSMT17_V1.tar"}  # not even the ROOT it made


def test_archive_without_msmt17_inside_says_what_it_expected(tmp_path, helpers):
    archive = helpers.build_archive(tmp_path / "a.zip", helpers.small_market())
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path / "root", source=archive)
    assert "does not hold MSMT17" in str(err.value)
    assert "MSMT17_V2/ with mask_train_v2, mask_test_v2/" in str(err.value)
    assert helpers.tree_files(tmp_path) == {"a.zip"}  # not even the ROOT it made


@pytest.mark.parametrize(
    ("list_name", "line", "complaint"),
    [
        ("list_query.txt", "0000/0000_001_01_x.jpg", "expected 'IMAGE_PATH PID'"),
        ("list_query.txt", "0000/0000_001_01_x.jpg zero", "expected 'IMAGE_PATH PID'"),
        ("list_val.txt", "../0000/0000_001_01_x.jpg 0", "paths in a list file are relative"),
        ("list_train.txt", "/etc/0000_001_01_x.jpg 0", "paths in a list file are relative"),
        ("list_gallery.txt", "0000/IMG_0001.jpg 0", "IMG_0001.jpg has no camera field"),
        ("list_gallery.txt", "0000/0000_099_04_x.jpg 0", "names 1 image(s) that are not in"),
    ],
)
def test_bad_list_line_is_named_with_its_file_and_line(
    tmp_path, helpers, list_name, line, complaint
):
    helpers.write_tree(tmp_path, small_msmt17(helpers, lines={list_name: line}))
    with pytest.raises(DatasetError) as err:
        prepare(tmp_path / "root", source=tmp_path / "MSMT17_V1", allow_mismatch=True)
    assert complaint in str(err.value)
    if "not in" not in complaint:
        line_number = 3 if list_name in ("list_train.txt", "list_val.txt", "list_query.txt") else 5
        assert f"{list_name} line {line_number}:" in str(err.value)


def test_missing_list_file_is_named(tmp_path, helpers):
    entries = {k: v for k, v in small_msmt17(helpers).items() if "list_val" not in k}
    helpers.write_tree(tmp_path, entries)
    with pytest.raises(DatasetError, match="has no list_val.txt; MSMT17 needs list_train.txt"):
        prepare(tmp_path / "root", source=tmp_path / "MSMT17_V1")


def test_variant_does_not_apply(tmp_path):
    with pytest.raises(DatasetError, match="cuhk03-np only"):
        prepare(tmp_path, variant="labeled")


def test_a_bad_image_in_the_archive_is_named_by_its_entry_and_nothing_is_left(
    tmp_path, helpers, small_counts
):
    entries = small_msmt17(helpers)
    bad = f"MSMT17_V1/test/{msmt17_name(0, 4, 10)}"
    entries[bad] = b"not a jpeg"
    root = tmp_path / "root"
    root.mkdir()
    helpers.build_archive(root / "MSMT17_V1.tar.gz", entries)
    with pytest.raises(DatasetError) as err:
        prepare(root)
    assert f"MSMT17_V1.tar.gz: entry {bad} is not a readable image" in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == ["MSMT17_V1.tar.gz"]  # no staging left
