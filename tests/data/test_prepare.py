import io
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reidkit.data.datasets import read_manifest
from reidkit.data.prepare import CountMismatchError, extract_archive, prepare_dataset
from reidkit.data.synthetic import SyntheticSpec
from reidkit.errors import DatasetError

MARKET = "Market-1501-v15.09.15"


def prepare(dataset, root, **kw):
    return prepare_dataset(dataset, root, progress=False, **kw)


@pytest.fixture
def market_zip(tmp_path, helpers):
    """A small Market archive in its official name, inside ROOT."""
    root = tmp_path / "root"
    root.mkdir()
    helpers.build_archive(root / f"{MARKET}.zip", helpers.small_market())
    return root


def test_archive_extracts_to_root_name_and_manifest_paths_are_relative(market_zip, helpers):
    result = prepare("market", market_zip, allow_mismatch=True)
    folder = market_zip / "market1501"
    assert result.manifest == folder / "manifest.csv"
    assert (folder / MARKET / "bounding_box_train" / "0002_c1s1_000451_03.jpg").is_file()
    assert helpers.tree_files(market_zip) >= {f"{MARKET}.zip", "market1501"}
    assert not [p for p in market_zip.iterdir() if p.name.startswith(".")]  # no staging left
    lines = result.manifest.read_text().splitlines()
    assert lines[0] == "path,pid,camid,split"
    assert lines[1] == f"{MARKET}/bounding_box_train/0002_c1s1_000451_03.jpg,2,1,train"


def test_junk_is_dropped_distractors_kept_and_non_images_ignored(market_zip):
    result = prepare("market", market_zip, allow_mismatch=True)
    frame = read_manifest(result.manifest)
    assert -1 not in set(frame["pid"])
    assert frame.loc[frame["pid"] == 0, "split"].tolist() == ["gallery"]
    assert not frame["path"].str.endswith("Thumbs.db").any()
    assert [(s.split, s.ids, s.images) for s in result.splits] == [
        ("train", 2, 4),
        ("query", 2, 2),
        ("gallery", 3, 3),
    ]
    record = json.loads((market_zip / "market1501" / "dataset.json").read_text())
    assert record["junk"] == 1 and record["dataset"] == "market1501"


def test_count_mismatch_from_an_archive_leaves_nothing_in_root(market_zip):
    with pytest.raises(CountMismatchError) as err:
        prepare("market1501", market_zip)
    rows = {what: (published, found) for what, published, found in err.value.rows}
    assert rows["train images"] == (12_936, 4)
    assert rows["query identities"] == (750, 2)
    assert rows["gallery images"] == (15_913, 3)
    assert "--allow-mismatch" in str(err.value)
    assert sorted(p.name for p in market_zip.iterdir()) == [f"{MARKET}.zip"]  # nothing else
    result = prepare("market1501", market_zip, allow_mismatch=True)
    assert not result.verified and not result.reused
    assert any("accepted (--allow-mismatch)" in w for w in result.warnings)


def test_an_extraction_left_by_an_older_reidkit_is_reused(market_zip):
    # earlier versions moved the extracted folder into ROOT/NAME before verifying
    prepare("market1501", market_zip, allow_mismatch=True)
    (market_zip / "market1501" / "manifest.csv").unlink()
    (market_zip / f"{MARKET}.zip").unlink()  # the second run must not need the archive
    result = prepare("market1501", market_zip, allow_mismatch=True)
    assert not result.verified and not result.reused


def test_folder_source_is_not_copied_and_paths_are_absolute(tmp_path, helpers):
    source = helpers.write_tree(tmp_path / "downloads", helpers.small_market())
    root = tmp_path / "root"
    result = prepare("market", root, source=source, allow_mismatch=True)
    assert helpers.tree_files(root) == {"market1501", "market1501/manifest.csv",
                                        "market1501/dataset.json"}  # fmt: skip
    frame = pd.read_csv(result.manifest)
    assert frame["path"].str.startswith(str(source / MARKET) + "/").all()


def test_extracted_folder_found_in_root_without_source(tmp_path, helpers):
    root = helpers.write_tree(tmp_path / "root", helpers.small_market())  # ROOT/Market-1501-.../
    result = prepare("market", root, allow_mismatch=True)
    assert read_manifest(result.manifest)["path"].str.startswith(str(root / MARKET)).all()


@pytest.mark.parametrize(
    ("dataset", "archive", "why"),
    [
        ("market", "Market-1501-v15.09.15.zip", "dead"),
        ("duke", "DukeMTMC-reID.zip", "withdrew"),
        ("cuhk03", "cuhk03-np.zip", "dead"),
    ],
)
def test_missing_source_names_the_archive_to_place(tmp_path, dataset, archive, why):
    with pytest.raises(DatasetError) as err:
        prepare(dataset, tmp_path)
    assert archive in str(err.value) and why in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_rerun_reuses_the_manifest_without_reading_images(market_zip):
    first = prepare("market", market_zip, allow_mismatch=True)
    image = market_zip / "market1501" / MARKET / "query" / "0003_c1s1_000101_00.jpg"
    image.write_bytes(b"garbage")  # a reuse that decoded images would now fail
    again = prepare("market", market_zip, allow_mismatch=True)
    assert again.reused and again.splits == first.splits and again.manifest == first.manifest
    with pytest.raises(DatasetError, match=str(image)):
        prepare("market", market_zip, allow_mismatch=True, check_images=True)  # decode again
    with pytest.raises(CountMismatchError):  # reuse still verifies the counts
        prepare("market", market_zip)
    image.unlink()
    with pytest.raises(DatasetError, match="1 missing file"):
        prepare("market", market_zip, allow_mismatch=True)


def test_corrupt_image_fails_with_its_path_and_no_manifest(tmp_path, helpers):
    entries = helpers.small_market()
    bad = f"{MARKET}/query/0003_c1s1_000101_00.jpg"
    entries[bad] = b"\xff\xd8 definitely not a jpeg"
    archive = helpers.build_archive(tmp_path / "m.tar.gz", entries)
    root = tmp_path / "root"
    with pytest.raises(DatasetError) as err:
        prepare("market", root, source=archive, allow_mismatch=True)
    assert f"m.tar.gz: entry {bad} is not a readable image" in str(err.value)
    assert not root.exists() or list(root.iterdir()) == []  # nothing extracted is left


def jpeg_cut_to(fraction: float) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[: int(len(data) * fraction)]


def test_a_jpeg_cut_to_60_percent_is_refused_by_default_and_passes_the_quick_check(
    tmp_path, helpers
):
    entries = helpers.small_market()
    entries[f"{MARKET}/query/0003_c1s1_000101_00.jpg"] = jpeg_cut_to(0.6)
    source = helpers.write_tree(tmp_path / "src", entries)
    with pytest.raises(DatasetError, match="0003_c1s1_000101_00.jpg is not a readable image"):
        prepare("market", tmp_path / "a", source=source, allow_mismatch=True)
    assert not (tmp_path / "a" / "market1501" / "manifest.csv").exists()
    quick = prepare("market", tmp_path / "b", source=source, allow_mismatch=True, quick_check=True)
    assert quick.manifest.exists()


def test_the_parallel_check_names_the_first_bad_image_in_manifest_order(tmp_path, monkeypatch):
    from reidkit.data import prepare as prepare_module

    good = tmp_path / "good.jpg"
    Image.new("RGB", (8, 16)).save(good)
    paths = [str(good)] * 300
    for index in (250, 120, 199):  # found in any order by the threads
        bad = tmp_path / f"bad{index}.jpg"
        bad.write_bytes(jpeg_cut_to(0.6))
        paths[index] = str(bad)
    monkeypatch.setattr(prepare_module, "CHECK_THREADS", 4)
    with pytest.raises(DatasetError, match=r"bad120\.jpg is not a readable image"):
        prepare_module._check_images(paths, full=True, progress=False)
    prepare_module._check_images(paths, full=False, progress=False)  # headers are intact


def unsafe_cases():
    ok = {f"{MARKET}/query/0003_c1s1_000101_00.jpg": b"x"}
    return [
        ("zip-dotdot", "a.zip", {**ok, "../../evil.txt": b"x"}, {}, {}),
        ("zip-absolute", "a.zip", {**ok, "/tmp/evil.txt": b"x"}, {}, {}),
        ("zip-backslash", "a.zip", {**ok, "..\\..\\evil.txt": b"x"}, {}, {}),
        ("zip-symlink", "a.zip", ok, {f"{MARKET}/out": "../../.."}, {}),
        ("tar-dotdot", "a.tar", {**ok, "x/../../../evil.txt": b"x"}, {}, {}),
        ("tar-symlink-then-write", "a.tar.gz",
         {**ok, f"{MARKET}/out/evil.txt": b"x"}, {f"{MARKET}/out": "/tmp"}, {}),
        ("tar-relative-symlink", "a.tar", ok, {f"{MARKET}/up": "../../../outside"}, {}),
        ("tar-hardlink", "a.tar", ok, {}, {f"{MARKET}/passwd": "../../etc/passwd"}),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("archive", "entries", "symlinks", "hardlinks"),
    [case[1:] for case in unsafe_cases()],
    ids=[case[0] for case in unsafe_cases()],
)
def test_unsafe_archive_is_refused_and_nothing_is_written(
    tmp_path, helpers, archive, entries, symlinks, hardlinks
):
    path = helpers.build_archive(
        tmp_path / archive, entries, symlinks=symlinks, hardlinks=hardlinks
    )
    root = tmp_path / "data" / "root"
    with pytest.raises(DatasetError, match="refusing to extract") as err:
        prepare("market", root, source=path)
    assert "nothing was extracted" in str(err.value)
    assert helpers.tree_files(tmp_path) == {archive}  # not even the folders it made


def test_links_inside_the_archive_are_skipped_not_created(tmp_path, helpers):
    target = tmp_path / "target"
    target.mkdir()
    archive = helpers.build_archive(
        tmp_path / "a.tar",
        {"top/a.jpg": b"x"},
        symlinks={"top/b.jpg": "a.jpg"},
        hardlinks={"top/c.jpg": "top/a.jpg"},
    )
    assert extract_archive(archive, target) == 2
    assert helpers.tree_files(target) == {"top", "top/a.jpg"}


def test_damaged_archive_is_one_clear_error(tmp_path, helpers):
    archive = tmp_path / f"{MARKET}.zip"
    archive.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DatasetError, match="damaged or not a valid archive"):
        prepare("market", tmp_path / "root", source=archive)
    assert not (tmp_path / "root").exists()  # nothing written, not even an empty ROOT


def test_wrong_layout_names_the_missing_folder(tmp_path, helpers):
    entries = {k: v for k, v in helpers.small_market().items() if "/query/" not in k}
    source = helpers.write_tree(tmp_path / "src", entries)
    with pytest.raises(DatasetError, match=r"has no query/ folder"):
        prepare("market", tmp_path / "root", source=source)


def test_file_name_without_pid_and_camera_is_named(tmp_path, helpers):
    entries = {**helpers.small_market(), f"{MARKET}/query/IMG_0001.jpg": helpers.tiny_image()}
    source = helpers.write_tree(tmp_path / "src", entries)
    with pytest.raises(DatasetError, match=r"query/IMG_0001.jpg: the name does not start"):
        prepare("market", tmp_path / "root", source=source, allow_mismatch=True)


def test_cuhk03_variants_get_their_own_folders_from_one_extraction(tmp_path, helpers):
    entries = {}
    for variant in ("detected", "labeled"):
        for folder, name in (
            ("bounding_box_train", "0001_c1_1.png"),
            ("query", "0002_c1_1.png"),
            ("bounding_box_test", "0002_c2_3.png"),
        ):
            entries[f"cuhk03-np/{variant}/{folder}/{name}"] = helpers.tiny_image(".png")
    root = tmp_path / "root"
    root.mkdir()
    helpers.build_archive(root / "cuhk03-np.tar.gz", entries)
    detected = prepare("cuhk03", root, allow_mismatch=True)
    (root / "cuhk03-np.tar.gz").unlink()  # labeled must come from the first extraction
    labeled = prepare("cuhk03", root, variant="labeled", allow_mismatch=True)
    assert (detected.name, labeled.name) == ("cuhk03-np", "cuhk03-np-labeled")
    assert read_manifest(labeled.manifest)["path"].str.contains("/labeled/").all()
    with pytest.raises(DatasetError, match="holds a prepared cuhk03-np labeled"):
        prepare("cuhk03", root, name="cuhk03-np-labeled", variant="detected")


CSV_IMAGES = ["img/a.jpg", "img/b.jpg", "img/c.jpg", "img/d.jpg", "img/e.jpg"]


@pytest.fixture
def write_csv(helpers):
    """Write CSV_IMAGES under a folder and a list.csv beside them; returns the CSV's path."""

    def write(folder, text):
        helpers.write_tree(folder, dict.fromkeys(CSV_IMAGES, helpers.tiny_image()))
        (folder / "list.csv").write_text(text)
        return folder / "list.csv"

    return write


def test_custom_csv_without_camids_puts_queries_in_their_own_camera(tmp_path, write_csv):
    csv = write_csv(
        tmp_path / "mine",
        "path,pid,split\nimg/a.jpg,5,train\nimg/b.jpg,7,query\nimg/c.jpg,7,gallery\n"
        "img/d.jpg,8,gallery\nimg/e.jpg,-1,gallery\n",
    )
    result = prepare("custom", tmp_path / "root", source=csv, name="mine")
    frame = read_manifest(result.manifest)
    assert frame["path"].tolist() == [str(tmp_path / "mine" / n) for n in CSV_IMAGES[:4]]
    assert dict(zip(frame["split"], frame["camid"], strict=False)) == {
        "train": 1,
        "query": 0,
        "gallery": 1,
    }
    assert not result.verified
    assert any("no camid column" in w for w in result.warnings)
    again = prepare("custom", tmp_path / "root", name="mine")  # no source: reuse
    assert again.reused and any("no camid column" in w for w in again.warnings)


def test_custom_csv_with_camids_keeps_them_and_warns_about_unmatched_queries(tmp_path, write_csv):
    csv = write_csv(
        tmp_path / "mine",
        "path,pid,camid,split\nimg/a.jpg,5,3,train\nimg/b.jpg,7,1,query\n"
        "img/c.jpg,7,1,gallery\nimg/d.jpg,8,2,gallery\n",
    )
    result = prepare("custom", tmp_path / "root", source=csv)
    frame = read_manifest(result.manifest)
    assert frame["camid"].tolist() == [3, 1, 1, 2]
    assert any("1 of 1 queries have no gallery image" in w for w in result.warnings)
    assert not any("no camid column" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("path,split\nimg/a.jpg,query\n", "lacks column(s) pid"),
        ("path,pid,split\nimg/zz.jpg,1,query\nimg/b.jpg,1,gallery\n", "img/zz.jpg"),
        ("path,pid,split\nimg/a.jpg,1,train\nimg/b.jpg,1,gallery\n", "has no query images"),
    ],
)
def test_bad_custom_csv_fails_clearly(tmp_path, write_csv, text, complaint):
    csv = write_csv(tmp_path / "mine", text)
    with pytest.raises(DatasetError) as err:
        prepare("custom", tmp_path / "root", source=csv)
    assert complaint in str(err.value)


def test_custom_without_source_explains_both_forms(tmp_path):
    with pytest.raises(DatasetError, match=r"--source.*bounding_box_train.*path,pid,split"):
        prepare("custom", tmp_path)


def test_custom_folder_reads_camids_from_names(tmp_path, helpers):
    source = helpers.write_tree(tmp_path / "src", helpers.small_market(top="."))
    result = prepare("custom", tmp_path / "root", source=source)
    frame = read_manifest(result.manifest)
    assert sorted(set(frame["camid"])) == [1, 2, 3]
    assert not result.verified and result.splits[0].images == 4


def test_prepared_folder_of_another_dataset_is_not_overwritten(market_zip, helpers, tmp_path):
    prepare("market", market_zip, allow_mismatch=True)
    source = helpers.write_tree(tmp_path / "src", helpers.small_market(top="."))
    with pytest.raises(DatasetError, match="holds a prepared market1501, not custom"):
        prepare("custom", market_zip, source=source, name="market1501")


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ".hidden", ""])
def test_name_must_be_a_plain_folder_name(tmp_path, name):
    with pytest.raises(DatasetError, match="plain folder name"):
        prepare("synthetic", tmp_path, name=name)


SMALL = SyntheticSpec(train_ids=3, test_ids=2, cameras=2, images_per_camera=2, distractors=1)


def test_synthetic_rerun_reuses_and_another_spec_is_refused_naming_the_options(tmp_path):
    first = prepare("synthetic", tmp_path, synthetic=SMALL)
    folder = tmp_path / "synthetic"
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    again = prepare("synthetic", tmp_path, synthetic=SMALL)
    assert again.reused and again.verified and first.verified
    # runs trained on it would go stale: a different spec does not regenerate it
    with pytest.raises(DatasetError) as err:
        prepare("synthetic", tmp_path, synthetic=replace(SMALL, seed=3, images_per_camera=3))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"{folder} holds a synthetic dataset generated with images_per_camera 2 --seed 0, not "
        "images_per_camera 3 --seed 3; repeat its options to re-verify it, or pass another --name"
    )
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} == before
    # a fresh one under another name
    other = prepare("synthetic", tmp_path, name="seed3", synthetic=replace(SMALL, seed=3))
    assert not other.reused and other.verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed3", "synthetic"]  # no leftovers


def test_synthetic_never_replaces_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "precious.txt").write_text("keep")
    with pytest.raises(DatasetError, match="was not made by `reidkit prepare synthetic`"):
        prepare("synthetic", tmp_path, synthetic=SMALL)
    assert (tmp_path / "synthetic" / "precious.txt").read_text() == "keep"


def test_leftover_staging_folder_is_reported(market_zip):
    (market_zip / ".market1501-abc.partial").mkdir()
    result = prepare("market", market_zip, allow_mismatch=True)
    assert any("interrupted prepare" in w for w in result.warnings)
