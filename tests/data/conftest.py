"""Fixtures for the data tests: tiny images, small Market layouts, archives, a synthetic set.

Helpers are handed out by fixtures (not imported), so they never depend on sys.path.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from reidkit.data.prepare import PreparedDataset, prepare_dataset
from reidkit.data.synthetic import SyntheticSpec

# Real person crops shared beside the repository (never copied into it); see its README.
CUHK03_SUBSET = Path(
    os.environ.get("REIDKIT_CUHK03_SUBSET")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "cuhk03-subset"
)


@cache
def tiny_image(suffix: str = ".jpg") -> bytes:
    """A valid 2x2 image; its bytes are reused under every file name."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 40)).save(buffer, "PNG" if suffix == ".png" else "JPEG")
    return buffer.getvalue()


def small_market(top: str = "Market-1501-v15.09.15") -> dict[str, bytes]:
    """A few Market-style files: 2 train ids, 2 query ids, a distractor, junk and Thumbs.db."""
    names = {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                               "0007_c1s1_000551_01.jpg", "0007_c3s1_000551_01.jpg"],
        "query": ["0003_c1s1_000101_00.jpg", "0004_c2s1_000201_00.jpg"],
        "bounding_box_test": ["0003_c2s1_000111_01.jpg", "0004_c1s1_000222_02.jpg",
                              "0000_c1s1_000999_01.jpg", "-1_c1s1_000001_01.jpg"],
    }  # fmt: skip
    entries = {
        f"{top}/{folder}/{n}": tiny_image() for folder, files in names.items() for n in files
    }
    entries[f"{top}/bounding_box_train/Thumbs.db"] = b"not an image"
    return entries


def write_tree(base: Path, entries: dict[str, bytes]) -> Path:
    for name, data in entries.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return base


def build_archive(
    path: Path,
    entries: dict[str, bytes],
    *,
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
) -> Path:
    """A .zip, .tar or .tar.gz (by suffix) of files, plus symbolic or (tar only) hard links."""
    symlinks, hardlinks = symlinks or {}, hardlinks or {}
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            for name, target in symlinks.items():
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, target)
            for name, data in entries.items():
                zf.writestr(name, data)
        return path
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
        for links, kind in ((symlinks, tarfile.SYMTYPE), (hardlinks, tarfile.LNKTYPE)):
            for name, target in links.items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tar.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tree_files(base: Path) -> set[str]:
    """Every path under `base`, relative, folders included."""
    return {str(p.relative_to(base)) for p in base.rglob("*")}


@pytest.fixture
def helpers():
    """The module's helper functions: helpers.build_archive(...), helpers.small_market(), ..."""
    return SimpleNamespace(
        tiny_image=tiny_image,
        small_market=small_market,
        write_tree=write_tree,
        build_archive=build_archive,
        tree_files=tree_files,
    )


@pytest.fixture(scope="session")
def synthetic_default(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    """The default synthetic dataset, generated once per session."""
    root = tmp_path_factory.mktemp("synthetic-root")
    return prepare_dataset("synthetic", root, synthetic=SyntheticSpec(), progress=False)


@pytest.fixture(scope="session")
def cuhk03_subset() -> Path:
    if not (CUHK03_SUBSET / "query").is_dir():
        pytest.skip(f"real images not available at {CUHK03_SUBSET}")
    return CUHK03_SUBSET
