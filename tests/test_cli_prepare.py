"""`reidkit prepare` end to end: archives with the published counts, bad inputs, real images.

The official archives are rebuilt here with every published count (tiny images: one image's
bytes under every name), once per session, so count verification runs on the real numbers.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.data.datasets import DATASETS

CUHK03_SUBSET = Path(
    os.environ.get("REIDKIT_CUHK03_SUBSET")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-subset"
)
runner = CliRunner()


def image_bytes(suffix: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (90, 60, 30)).save(buffer, "PNG" if suffix == ".png" else "JPEG")
    return buffer.getvalue()


def official_entries(
    dataset: str, variant: str, top: str, *, junk: int = 0, distractors: int = 0
) -> dict[str, bytes]:
    """Archive entries (name -> bytes) with exactly the published counts of one variant."""
    spec = DATASETS[dataset]
    counts = spec.variant(variant).counts
    suffix = spec.extensions[1] if dataset == "cuhk03-np" else spec.extensions[0]
    data = image_bytes(suffix)
    train_pids = range(1, counts.train_ids + 1)
    test_pids = range(counts.train_ids + 1, counts.train_ids + counts.query_ids + 1)
    gallery = [0] * distractors + [-1] * junk  # then test pids for the rest
    splits = {
        "bounding_box_train": [train_pids[j % len(train_pids)] for j in range(counts.train_images)],
        "query": [test_pids[j % len(test_pids)] for j in range(counts.query_images)],
        "bounding_box_test": gallery
        + [test_pids[j % len(test_pids)] for j in range(counts.gallery_images - distractors)],
    }
    entries = {}
    for folder, pids in splits.items():
        for j, pid in enumerate(pids):
            camera = j % spec.cameras + 1
            entries[f"{top}/{folder}/{pid:04d}_c{camera}s1_{j:06d}_00{suffix}"] = data
        entries[f"{top}/{folder}/Thumbs.db"] = b"\x00 not an image"
    return entries


def write_archive(path: Path, entries: dict[str, bytes], symlinks=None) -> Path:
    symlinks = symlinks or {}
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            for name, target in symlinks.items():
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, target)
            for name, data in entries.items():
                zf.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for name, target in symlinks.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def market_root(tmp_path_factory) -> Path:
    """ROOT holding Market-1501-v15.09.15.zip with the published counts, junk and distractors."""
    root = tmp_path_factory.mktemp("market-root")
    top = "Market-1501-v15.09.15"
    entries = official_entries("market1501", "detected", top, junk=3_819, distractors=2_793)
    write_archive(root / f"{top}.zip", entries)
    return root


@pytest.fixture(scope="session")
def duke_archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("duke-download")
    entries = official_entries("dukemtmc-reid", "detected", "DukeMTMC-reID")
    return write_archive(folder / "DukeMTMC-reID.tar", entries)


@pytest.fixture(scope="session")
def cuhk03_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuhk03-root")
    entries = {}
    for variant in ("detected", "labeled"):
        entries.update(official_entries("cuhk03-np", variant, f"cuhk03-np/{variant}"))
    write_archive(root / "cuhk03-np.tar.gz", entries)
    return root


def invoke(*args: str | Path):
    result = runner.invoke(app, ["prepare", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def manifest_rows(path: Path) -> pd.Series:
    return pd.read_csv(path)["split"].value_counts()


def test_market_from_the_official_zip_in_root_is_verified_then_reused(market_root):
    result = invoke("market", market_root)
    assert result.exit_code == 0, result.output
    assert "verified against the published counts" in result.stdout
    assert "12,936" in result.stdout and "15,913" in result.stdout
    manifest = market_root / "market1501" / "manifest.csv"
    assert manifest_rows(manifest).to_dict() == {
        "gallery": 15_913,
        "train": 12_936,
        "query": 3_368,
    }
    assert (market_root / "market1501" / "Market-1501-v15.09.15" / "query").is_dir()
    before = manifest.stat().st_mtime_ns
    again = invoke("market1501", market_root)
    assert again.exit_code == 0
    assert "reused existing manifest; verified against the published counts" in again.stdout
    assert manifest.stat().st_mtime_ns == before


def test_duke_from_a_tar_source_is_extracted_under_root(duke_archive, tmp_path):
    result = invoke("duke", tmp_path, "--source", duke_archive)
    assert result.exit_code == 0, result.output
    assert "verified against the published counts" in result.stdout
    assert (tmp_path / "dukemtmc-reid" / "DukeMTMC-reID" / "bounding_box_test").is_dir()
    rows = manifest_rows(tmp_path / "dukemtmc-reid" / "manifest.csv")
    assert (rows["train"], rows["query"], rows["gallery"]) == (16_522, 2_228, 17_661)


def test_cuhk03_detected_and_labeled_from_one_tar_gz(cuhk03_root):
    detected = invoke("cuhk03", cuhk03_root)
    labeled = invoke("cuhk03-np", cuhk03_root, "--variant", "labeled")
    assert detected.exit_code == 0 and labeled.exit_code == 0, labeled.output
    assert "verified against the published counts" in labeled.stdout
    rows = manifest_rows(cuhk03_root / "cuhk03-np" / "manifest.csv")
    assert (rows["train"], rows["gallery"]) == (7_365, 5_332)
    rows = manifest_rows(cuhk03_root / "cuhk03-np-labeled" / "manifest.csv")
    assert (rows["train"], rows["gallery"]) == (7_368, 5_328)


@pytest.fixture
def small_market_zip(tmp_path) -> Path:
    """A Market archive with a handful of images: counts far from the published ones."""
    names = ["0001_c1s1_000001_00.jpg", "0001_c2s1_000002_00.jpg"]
    entries = {
        f"Market-1501-v15.09.15/{folder}/{name}": image_bytes(".jpg")
        for folder in ("bounding_box_train", "query", "bounding_box_test")
        for name in names
    }
    return write_archive(tmp_path / "Market-1501-v15.09.15.zip", entries)


def test_count_mismatch_prints_the_table_and_writes_no_manifest(small_market_zip, tmp_path):
    root = tmp_path / "root"
    result = invoke("market", root, "--source", small_market_zip)
    assert result.exit_code == 1
    assert "counts: published vs found" in result.stderr
    assert "12,936" in result.stderr and "train images" in result.stderr
    (line,) = error_lines(result)
    assert "counts differ from the published ones" in line and "--allow-mismatch" in line
    assert not (root / "market1501" / "manifest.csv").exists()


def test_allow_mismatch_accepts_with_a_warning(small_market_zip, tmp_path):
    result = invoke("market", tmp_path / "root", "--source", small_market_zip, "--allow-mismatch")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "accepted (--allow-mismatch)" in result.stderr
    assert "counts not verified" in result.stdout
    assert (tmp_path / "root" / "market1501" / "manifest.csv").is_file()


@pytest.mark.parametrize(
    ("entry", "symlink"),
    [("../../evil.txt", None), ("/tmp/reidkit-evil.txt", None), (None, "/tmp")],
    ids=["dotdot", "absolute", "symlink-escaping"],
)
def test_unsafe_archive_is_refused_and_nothing_is_written_outside_root(tmp_path, entry, symlink):
    entries = {"Market-1501-v15.09.15/query/0001_c1s1_000001_00.jpg": image_bytes(".jpg")}
    symlinks = {}
    if entry:
        entries[entry] = b"evil"
    else:  # a link out of the archive, then a file written through it
        symlinks["Market-1501-v15.09.15/out"] = symlink
        entries["Market-1501-v15.09.15/out/reidkit-evil.txt"] = b"evil"
    (tmp_path / "downloads").mkdir()
    archive = write_archive(tmp_path / "downloads" / "a.tar", entries, symlinks)
    root = tmp_path / "deep" / "root"
    result = invoke("market", root, "--source", archive)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "refusing to extract" in line and "nothing was extracted" in line
    # nothing written at all: not even the empty ROOT (and its parent) the run had made
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.tar", "downloads"]
    assert not Path("/tmp/reidkit-evil.txt").exists()


def test_corrupt_image_is_named(tmp_path):
    entries = {
        f"Market-1501-v15.09.15/{folder}/0001_c1s1_000001_00.jpg": image_bytes(".jpg")
        for folder in ("bounding_box_train", "query", "bounding_box_test")
    }
    entries["Market-1501-v15.09.15/query/0002_c2s1_000009_00.jpg"] = b"\xff\xd8\xff rubbish"
    archive = write_archive(tmp_path / "m.zip", entries)
    result = invoke("market", tmp_path / "root", "--source", archive, "--allow-mismatch")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "query/0002_c2s1_000009_00.jpg is not a readable image" in line


def test_missing_source_says_which_file_to_place_where(tmp_path):
    result = invoke("duke", tmp_path)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "place DukeMTMC-reID.zip (or its extracted folder DukeMTMC-reID/)" in line
    assert str(tmp_path) in line and "withdrew" in line


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["viper"], "unknown dataset 'viper'"),
        (["synthetic", "--cameras", "1"], "--cameras must be between 2"),
        (["custom", "--source", "/nonexistent/folder"], "does not exist"),
    ],
)
def test_bad_input_is_one_red_line(tmp_path, args, complaint):
    dataset, *options = args
    result = invoke(dataset, tmp_path, *options)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert complaint in line
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="session")
def cuhk03_subset() -> Path:
    if not (CUHK03_SUBSET / "query").is_dir():
        pytest.skip(f"real images not available at {CUHK03_SUBSET}")
    return CUHK03_SUBSET


def test_custom_folder_of_real_images(cuhk03_subset, tmp_path):
    result = invoke("custom", tmp_path, "--source", cuhk03_subset, "--name", "subset")
    assert result.exit_code == 0, result.output
    assert "counts not verified" in result.stdout
    frame = pd.read_csv(tmp_path / "subset" / "manifest.csv")
    counts = {split: rows for split, rows in frame.groupby("split")}
    assert (counts["train"]["pid"].nunique(), len(counts["train"])) == (743, 7_239)
    assert (counts["query"]["pid"].nunique(), len(counts["query"])) == (100, 200)
    assert len(counts["gallery"]) == 738
    assert frame["path"].str.startswith(str(cuhk03_subset)).all()  # not copied
    assert set(frame["camid"]) == {1, 2}


def test_custom_csv_without_camids_is_reported(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(image_bytes(".jpg"))
    csv = folder / "list.csv"
    csv.write_text("path,pid,split\na.jpg,1,train\nb.jpg,2,query\nc.jpg,2,gallery\n")
    result = invoke("custom", tmp_path / "root", "--source", csv)
    assert result.exit_code == 0, result.output
    assert "no camid column" in result.stderr
    frame = pd.read_csv(tmp_path / "root" / "custom" / "manifest.csv")
    assert frame.set_index("split")["camid"].to_dict() == {"train": 1, "query": 0, "gallery": 1}


def test_synthetic_is_generated_then_reused(tmp_path):
    args = ("synthetic", tmp_path, "--train-ids", "5", "--test-ids", "3", "--cameras", "3")
    result = invoke(*args, "--seed", "4")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "synthetic" / "manifest.csv")
    assert frame.loc[frame["split"] == "train", "pid"].nunique() == 5
    assert set(frame["camid"]) == {1, 2, 3}
    assert "reused existing manifest" in invoke(*args, "--seed", "4").stdout
    # the README's re-run without the original options: refused, not silently regenerated
    manifest = (tmp_path / "synthetic" / "manifest.csv").read_bytes()
    bare = invoke("synthetic", tmp_path)
    assert bare.exit_code == 1
    (line,) = error_lines(bare)
    assert "generated with --train-ids 5 --test-ids 3 --cameras 3 --seed 4, not " in line
    assert "--train-ids 60 --test-ids 40 --cameras 4 --seed 0" in line
    assert (tmp_path / "synthetic" / "manifest.csv").read_bytes() == manifest
