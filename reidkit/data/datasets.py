"""Dataset specs (layout, file-name pattern, published counts) and the manifest format."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from reidkit.errors import DatasetError

# The three evaluation splits, in manifest order, and the Market-1501 folder that holds each.
SPLITS = ("train", "query", "gallery")
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

# Pid and camera at the start of a Market-style file name, e.g. `0002_c1s1_000451_03.jpg`
# -> 2, 1 (junk boxes are `-1_c...`); the camera is every digit after `c`, so `c12` is 12.
# Read names with `parse_market_name`.
FILENAME_PATTERN = re.compile(r"(-?\d+)_c(\d+)", re.ASCII)
# MSMT17's `PID_INDEX_CAM_DATETIME_FRAME_N.jpg`, e.g. `0000_000_01_0303morning_0015_0.jpg`:
# the third field is the camera, two digits (01-15). Read names with `parse_msmt17_camera`.
MSMT17_NAME_PATTERN = re.compile(r"\d+_\d+_(\d{2})_", re.ASCII)
JUNK_PID = -1  # Market-1501's badly detected boxes: dropped everywhere
DISTRACTOR_PID = 0  # Market-1501's distractors: kept in the gallery as negatives


def negative_pid_error(pid: int, where: str) -> DatasetError:
    """The one rule for pids below -1, which no dataset defines: refused, naming the row."""
    return DatasetError(
        f"{where}: pid {pid} is negative; pids are 0 or more, and only -1 has a meaning "
        "(a junk box, dropped, as in Market-1501): renumber the identities"
    )


# Pids and camera ids are stored as 64-bit integers (numpy, pandas, torch): a larger number
# would wrap around (to a negative pid) or break every command that reads the manifest.
ID_MAX = 2**63 - 1


def too_large_error(column: str, value: int | str, where: str) -> DatasetError:
    """The one rule for a pid or camid beyond 64 bits: refused at prepare, naming the row."""
    negative = str(value).strip().startswith("-")
    limit = f"at least {-ID_MAX - 1:,}" if negative else f"at most {ID_MAX:,}"
    return DatasetError(
        f"{where}: {column} {value} is too {'small' if negative else 'large'} ({limit}, a "
        "64-bit integer): renumber the identities"
    )


def check_id_range(column: str, value: int, where: str) -> None:
    """Refuse a pid or camid (read from a file name) that does not fit 64 bits."""
    if not -ID_MAX - 1 <= value <= ID_MAX:
        raise too_large_error(column, value, where)


MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("path", "pid", "camid", "split")

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DEFAULT_VARIANT = "detected"  # the paper's CUHK03-NP boxes; the only name one-variant sets accept


@dataclass(frozen=True)
class PublishedCounts:
    """Counts a prepared split must match; the gallery's identities are not published for all."""

    train_ids: int
    train_images: int
    query_ids: int
    query_images: int
    gallery_images: int
    cameras: int  # distinct cameras over all three splits


@dataclass(frozen=True)
class VariantSpec:
    """One published set of boxes inside a dataset's extracted folder."""

    subfolder: str  # below the extracted folder; "" when the split folders sit at its top
    default_name: str  # folder under ROOT that `prepare` writes the manifest to
    counts: PublishedCounts


@dataclass(frozen=True)
class DatasetSpec:
    """Where an official dataset comes from, how it is laid out and what it must contain."""

    name: str  # canonical name, also the default folder under ROOT
    title: str  # as the dataset's paper spells it
    archive: str  # the official archive's file name
    folder: str  # the folder the archive extracts to
    cameras: int
    availability: str  # why reidkit cannot fetch it: said when no source is found
    variants: Mapping[str, VariantSpec] = field(hash=False)
    extensions: tuple[str, ...] = (".jpg", ".png")

    @property
    def archive_names(self) -> tuple[str, ...]:
        """The official archive's name in every accepted form: .zip, .tar, .tar.gz, .tgz."""
        stem = strip_archive_suffix(self.archive)
        return tuple(stem + suffix for suffix in ARCHIVE_SUFFIXES)

    def variant(self, name: str = DEFAULT_VARIANT) -> VariantSpec:
        """The box set called `name`; a dataset with one set accepts only the default name."""
        if name in self.variants:
            return self.variants[name]
        if len(self.variants) == 1:
            if name == DEFAULT_VARIANT:
                return next(iter(self.variants.values()))
            raise DatasetError(
                f"{self.name} has a single set of boxes; --variant ({DEFAULT_VARIANT} or "
                "labeled) applies to cuhk03-np only"
            )
        raise DatasetError(
            f"unknown variant {name!r} for {self.name}; choose one of {', '.join(self.variants)}"
        )


@dataclass(frozen=True)
class ListRelease:
    """One release of a dataset whose splits are given by list files (MSMT17_V1, MSMT17_V2)."""

    folder: str  # what its archive extracts to; holds the list files and the image folders
    archive: str  # as its authors hand it out
    image_folders: Mapping[str, str] = field(hash=False)  # list file -> folder its paths are in


@dataclass(frozen=True)
class ListDatasetSpec:
    """A dataset laid out as image folders plus list files of `relative/path.jpg PID` lines."""

    name: str  # canonical name, also the folder under ROOT
    title: str
    availability: str  # why reidkit cannot fetch it: said when no source is found
    counts: PublishedCounts
    lists: Mapping[str, tuple[str, ...]] = field(hash=False)  # split -> its list files
    releases: tuple[ListRelease, ...] = ()

    @property
    def list_files(self) -> tuple[str, ...]:
        """Every list file, in manifest order (train, query, gallery)."""
        return tuple(name for names in self.lists.values() for name in names)


def _single(name: str, counts: PublishedCounts) -> Mapping[str, VariantSpec]:
    return {"default": VariantSpec(subfolder="", default_name=name, counts=counts)}


# Counts from each dataset's paper and the CUHK03-NP protocol (Zhong et al., CVPR 2017).
DATASETS: dict[str, DatasetSpec] = {
    "market1501": DatasetSpec(
        name="market1501",
        title="Market-1501",
        archive="Market-1501-v15.09.15.zip",
        folder="Market-1501-v15.09.15",
        cameras=6,
        availability="its official download link is dead",
        variants=_single(
            "market1501",
            # gallery: 19,732 files minus 3,819 junk (pid -1); the 2,793 distractors (pid 0) stay
            PublishedCounts(751, 12_936, 750, 3_368, 15_913, cameras=6),
        ),
    ),
    "dukemtmc-reid": DatasetSpec(
        name="dukemtmc-reid",
        title="DukeMTMC-reID",
        archive="DukeMTMC-reID.zip",
        folder="DukeMTMC-reID",
        cameras=8,
        availability="its authors withdrew it and the official links are dead",
        variants=_single("dukemtmc-reid", PublishedCounts(702, 16_522, 702, 2_228, 17_661, 8)),
    ),
    "cuhk03-np": DatasetSpec(
        name="cuhk03-np",
        title="CUHK03-NP",
        archive="cuhk03-np.zip",
        folder="cuhk03-np",
        cameras=2,
        availability="its official download links are dead",
        variants={
            "detected": VariantSpec(
                "detected", "cuhk03-np", PublishedCounts(767, 7_365, 700, 1_400, 5_332, 2)
            ),
            "labeled": VariantSpec(
                "labeled", "cuhk03-np-labeled", PublishedCounts(767, 7_368, 700, 1_400, 5_328, 2)
            ),
        },
    ),
}

# MSMT17 (Wei et al., CVPR 2018): the training set is list_train.txt and list_val.txt together
# (the val list holds training identities, drawn from the same train/ images), as the paper
# counts it; torchreid and fast-reid train on list_train.txt alone unless told to combine.
# Test pids start again at 0, so a pid names a person only within training or within test.
# V1 and V2 hold the same boxes under other folder names; V2 has the faces blurred.
_MSMT17_TRAIN = ("list_train.txt", "list_val.txt")
_MSMT17_TEST = ("list_query.txt", "list_gallery.txt")
LIST_DATASETS: dict[str, ListDatasetSpec] = {
    "msmt17": ListDatasetSpec(
        name="msmt17",
        title="MSMT17",
        availability=(
            "its authors give it out on request (https://www.pkuvmc.com/publications/msmt17.html)"
        ),
        counts=PublishedCounts(1_041, 32_621, 3_060, 11_659, 82_161, cameras=15),
        lists={
            "train": _MSMT17_TRAIN,
            "query": ("list_query.txt",),
            "gallery": ("list_gallery.txt",),
        },
        releases=(
            ListRelease(
                "MSMT17_V1",
                "MSMT17_V1.tar.gz",
                {**dict.fromkeys(_MSMT17_TRAIN, "train"), **dict.fromkeys(_MSMT17_TEST, "test")},
            ),
            ListRelease(
                "MSMT17_V2",
                "MSMT17_V2.zip",
                {
                    **dict.fromkeys(_MSMT17_TRAIN, "mask_train_v2"),
                    **dict.fromkeys(_MSMT17_TEST, "mask_test_v2"),
                },
            ),
        ),
    ),
}

# Every name a user may type -> canonical name. `custom` and `synthetic` have no spec.
DATASET_NAMES: dict[str, str] = {
    "market1501": "market1501",
    "market": "market1501",
    "dukemtmc-reid": "dukemtmc-reid",
    "duke": "dukemtmc-reid",
    "cuhk03-np": "cuhk03-np",
    "cuhk03": "cuhk03-np",
    "msmt17": "msmt17",
    "msmt": "msmt17",
    "custom": "custom",
    "synthetic": "synthetic",
}


def canonical_name(name: str) -> str:
    """The canonical dataset name for a name or short name, case-insensitive."""
    key = name.strip().lower()
    if key not in DATASET_NAMES:
        canonical = ", ".join(dict.fromkeys(DATASET_NAMES.values()))
        raise DatasetError(
            f"unknown dataset {name!r}; choose one of {canonical} "
            "(short names: market, duke, cuhk03, msmt)"
        )
    return DATASET_NAMES[key]


def parse_market_name(name: str) -> tuple[int, int] | None:
    """(pid, camid) from a file name that starts `PID_cCAM`, else None.

    `0002_c1s1_000451_03.jpg` -> (2, 1); `-1_c3s2_000001_01.jpg` -> (-1, 3) (a junk box). The
    name must start with the pattern: `holiday_2019_c1.jpg` and `2024-01-15_c1_0001.jpg` give
    None, never a pid read from the middle of the name. The camera id is kept as the name
    writes it (c1 -> 1): no shift anywhere in reidkit.
    """
    match = FILENAME_PATTERN.match(name)
    # ASCII digits with at most a leading minus: int() cannot fail on what the pattern took
    return (int(match[1]), int(match[2])) if match else None


def parse_msmt17_camera(name: str) -> int | None:
    """The camera of an MSMT17 file name (its third field, two digits), else None.

    `0000_000_01_0303morning_0015_0.jpg` -> 1, `0123_045_12_0302noon_0321_1.jpg` -> 12; the
    number is kept as the name writes it (cameras 1-15), like every camera id in reidkit.
    """
    match = MSMT17_NAME_PATTERN.match(name)
    return int(match[1]) if match else None


def strip_archive_suffix(filename: str) -> str:
    """`Market-1501-v15.09.15.zip` -> `Market-1501-v15.09.15`; other names unchanged."""
    lowered = filename.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lowered.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def dataset_folder(dataset: str) -> str:
    """The prepared folder's name: official and short names map to the canonical name; any
    other name (a `--name` given to `prepare`, e.g. `cuhk03-np-labeled`) is the folder itself."""
    try:
        return canonical_name(dataset)
    except DatasetError:
        return dataset


def manifest_path(root: Path, dataset: str) -> Path:
    """ROOT/<dataset_folder(dataset)>/manifest.csv."""
    return Path(root).expanduser() / dataset_folder(dataset) / MANIFEST_NAME


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest: columns path (absolute str), pid and camid (int64), split (str).

    Relative paths are relative to the manifest's folder. Rows keep the file's order.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no manifest at {path}; {_prepare_hint(path.parent)}")
    return read_table(path)


def _prepare_hint(folder: Path) -> str:
    """How to prepare the dataset a missing ROOT/NAME/manifest.csv stands for."""
    name, root = folder.name, folder.parent
    if os.path.lexists(root) and not root.is_dir():  # `prepare ... ROOT` would fail on it too
        return (
            f"the data root {root} is a file, not a folder: give the folder that holds prepared "
            "datasets (--data-root or $REIDKIT_DATA)"
        )
    for spec in DATASETS.values():
        for variant, layout in spec.variants.items():
            if layout.default_name == name:
                # a one-set dataset's only key ("default") is not a name --variant accepts
                named = len(spec.variants) > 1 and variant != DEFAULT_VARIANT
                option = f" --variant {variant}" if named else ""
                return f"run `reidkit prepare {spec.name} {root}{option}` first"
    if name == "synthetic" or name in LIST_DATASETS:
        return f"run `reidkit prepare {name} {root}` first"
    try:
        prepared = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST_NAME}"))
    except OSError:
        prepared = []
    listed = ", ".join(prepared) if prepared else "none"
    return (
        f"datasets prepared in {root}: {listed}; to prepare a folder or CSV as {name!r}, "
        f"run `reidkit prepare custom {root} --source FOLDER_OR_CSV --name {name}`"
    )


def read_table(path: Path, *, camid_optional: bool = False) -> pd.DataFrame:
    """Parse a CSV in manifest form (a manifest, or the CSV a custom dataset is described by).

    With `camid_optional`, a table without a camid column is accepted and returned without one.
    Relative paths are resolved against the CSV's folder; extra columns are dropped.
    """
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not a readable CSV file ({err})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    wanted = [c for c in MANIFEST_COLUMNS if c != "camid" or "camid" in frame.columns]
    required = [c for c in MANIFEST_COLUMNS if c != "camid" or not camid_optional]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{path} lacks column(s) {', '.join(missing)}; expected columns "
            f"{','.join(required)}{' and optionally camid' if camid_optional else ''}"
        )
    frame = frame[wanted].copy()
    for column in ("pid", "camid"):
        if column in frame.columns:
            frame[column] = _integer_column(frame[column], column, path)
    below_junk = frame["pid"] < JUNK_PID
    if below_junk.any():
        row = int(below_junk.to_numpy().argmax())
        raise negative_pid_error(int(frame["pid"].iloc[row]), f"{path} line {row + 2}")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        row = int(bad_split.to_numpy().argmax())
        raise DatasetError(
            f"{path} line {row + 2}: split {frame['split'].iloc[row]!r} is not one of "
            f"{', '.join(SPLITS)}"
        )
    empty = frame["path"].str.strip() == ""
    if empty.any():
        raise DatasetError(f"{path} line {int(empty.to_numpy().argmax()) + 2}: empty path")
    frame["path"] = resolve_paths(frame["path"].tolist(), path.parent)
    return frame


def resolve_paths(paths: list[str], folder: Path) -> list[str]:
    """Make manifest paths absolute: relative ones are relative to `folder`."""
    base = os.path.abspath(folder)
    return [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in paths]


def _integer_column(values: pd.Series, column: str, path: Path) -> pd.Series:
    """A column of integers as int64; a value that is not one (text, inf, 1.5) or does not
    fit 64 bits is refused naming its line."""
    numbers = pd.to_numeric(values, errors="coerce")
    # to_numeric reads "inf" as infinity and a 20-digit number as an inexact float
    bad = numbers.isna() | ~np.isfinite(numbers) | (numbers != numbers.round())
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise DatasetError(
            f"{path} line {row + 2}: {column} {values.iloc[row]!r} is not an integer"
        )
    near_limit = numbers.abs() >= 2**53  # past float64's exact integers: check the text
    for row in np.flatnonzero(near_limit.to_numpy()):
        text = str(values.iloc[row]).strip()
        exact = int(text) if re.fullmatch(r"[-+]?\d+", text) else int(float(text))
        if not -ID_MAX - 1 <= exact <= ID_MAX:
            raise too_large_error(column, text, f"{path} line {row + 2}")
    return numbers.astype("int64")
