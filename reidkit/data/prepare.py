"""Prepare a dataset: archive or folder -> verified ROOT/NAME/manifest.csv, with safe extraction.

Layout of a prepared dataset:

    ROOT/NAME/manifest.csv   path,pid,camid,split; written last, so its presence means "done"
    ROOT/NAME/dataset.json   what was prepared from what (dataset, variant, source, notes)
    ROOT/NAME/<folder>/      an extracted archive or generated images (paths in the manifest
                             are relative to ROOT/NAME); a folder source stays where it is and
                             the manifest holds absolute paths into it

camid is the camera number as the file name writes it (Market's `c1` is 1), or a custom CSV's
camid column; a CSV without one gets QUERY_CAMID / OTHER_CAMID (see below).
"""

from __future__ import annotations

import errno
import gzip
import itertools
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import rich.progress
from PIL import Image
from rich.console import Console

from reidkit import __version__
from reidkit.data.datasets import (
    ARCHIVE_SUFFIXES,
    DATASETS,
    DEFAULT_VARIANT,
    JUNK_PID,
    LIST_DATASETS,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    SPLIT_FOLDERS,
    SPLITS,
    DatasetSpec,
    ListDatasetSpec,
    ListRelease,
    PublishedCounts,
    VariantSpec,
    canonical_name,
    check_id_range,
    negative_pid_error,
    parse_market_name,
    parse_msmt17_camera,
    read_manifest,
    read_table,
    strip_archive_suffix,
)
from reidkit.data.synthetic import SyntheticSpec, generate_synthetic
from reidkit.errors import DatasetError
from reidkit.outputs import check_writable, os_error_reason, write_text
from reidkit.terminal import draws_bars

RECORD_NAME = "dataset.json"
CUSTOM_EXTENSIONS = (".jpg", ".jpeg", ".png")
# A custom CSV without camids: every query gets camera 0 and every other image camera 1, so the
# protocol's "drop same pid and same camera" rule can never remove a query's true matches.
QUERY_CAMID, OTHER_CAMID = 0, 1
CAMID_NOTE = (
    "the CSV has no camid column: queries were given camid 0 and all other images camid 1, "
    "so no gallery image is dropped as a same-camera match (keep query images out of the "
    "gallery, or they match themselves)"
)
# How images are checked: "full" decodes each one on a first prepare, "quick" reads headers
# only, "recheck" also decodes the images of an already prepared dataset.
ImageCheck = Literal["full", "quick", "recheck"]
_PARTIAL = ".partial"  # suffix of the staging folders that extraction and generation write to
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class CountMismatchError(DatasetError):
    """Counts differ from the published ones; `rows` holds (what, published, found) for all."""

    def __init__(self, message: str, rows: list[tuple[str, int, int]]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass(frozen=True)
class SplitSummary:
    """What one split of a prepared dataset holds."""

    split: str  # train, query or gallery
    ids: int  # distinct pids; the gallery's count includes the distractor pid 0
    images: int
    cameras: int


@dataclass(frozen=True)
class PreparedDataset:
    """The outcome of `prepare_dataset`: where the manifest is and what it holds."""

    name: str  # folder under ROOT; the name to train and evaluate with
    manifest: Path
    splits: tuple[SplitSummary, ...]  # train, query, gallery
    verified: bool  # counts matched the published ones (synthetic: the ones its spec promises)
    reused: bool  # an existing manifest was checked and kept
    warnings: tuple[str, ...]


def prepare_dataset(
    dataset: str,
    root: Path,
    *,
    source: Path | None = None,
    name: str | None = None,
    variant: str = "detected",
    allow_mismatch: bool = False,
    check_images: bool = False,
    quick_check: bool = False,
    synthetic: SyntheticSpec | None = None,
    progress: bool = True,
) -> PreparedDataset:
    """Write ROOT/NAME/manifest.csv for a dataset and return what it holds.

    Official datasets (market1501, dukemtmc-reid, cuhk03-np, msmt17) come from `source` (an
    archive or a folder) or, without it, from the official archive or extracted folder in ROOT;
    their counts must match the published ones unless `allow_mismatch`. `custom` takes a folder in
    Market-1501 layout or a CSV (path,pid,split[,camid]) and reports its counts unverified.
    `synthetic` generates images from `synthetic` (default: SyntheticSpec()). A dataset that is
    already prepared is re-checked (files exist, counts) and reused without reading any image.
    Every image is decoded fully (in parallel), or with `quick_check` only its header is read
    (fast, but a truncated JPEG passes). `check_images` decodes every image even of an
    already prepared dataset.
    """
    if check_images and quick_check:
        raise DatasetError("give --check-images (decode again) or --quick-check, not both")
    images: ImageCheck = "recheck" if check_images else "quick" if quick_check else "full"
    canonical = canonical_name(dataset)
    root = Path(os.path.abspath(Path(root).expanduser()))
    if os.path.lexists(root) and not root.is_dir():
        raise DatasetError(
            f"ROOT {root} is a file, not a folder; give the folder to prepare datasets in (the "
            "dataset goes to ROOT/NAME)"
        )
    if source is not None:
        source = Path(os.path.abspath(Path(source).expanduser()))
    if canonical == "synthetic":
        folder = root / _folder_name(name, "synthetic")
        with _preparing(folder):
            return _prepare_synthetic(synthetic or SyntheticSpec(), folder, progress)
    if canonical == "custom":
        folder = root / _folder_name(name, "custom")
        with _preparing(folder):
            return _prepare_custom(folder, source, images, progress)
    if canonical in LIST_DATASETS:
        listed = LIST_DATASETS[canonical]
        if variant != DEFAULT_VARIANT:
            raise DatasetError(
                f"{listed.name} has a single set of boxes; --variant ({DEFAULT_VARIANT} or "
                "labeled) applies to cuhk03-np only"
            )
        folder = root / _folder_name(name, listed.name)
        with _preparing(folder):
            return _prepare_listed(listed, folder, source, allow_mismatch, images, progress)
    spec = DATASETS[canonical]
    layout = spec.variant(variant)
    folder = root / _folder_name(name, layout.default_name)
    variant_key = variant if len(spec.variants) > 1 else None  # recorded, and checked on reuse
    with _preparing(folder):
        return _prepare_official(
            spec, layout, variant_key, folder, source, allow_mismatch, images, progress
        )


@contextmanager
def _preparing(folder: Path) -> Iterator[None]:
    """On any failure, remove the folders this prepare made on the way to `folder` (empty
    ones only), and name `folder` where the system names a staging path or nothing (a full
    disk while images are generated or extracted)."""
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]  # deepest first
    try:
        yield
    except BaseException as err:
        for path in made:
            if not os.path.lexists(path):  # never made after all (e.g. ROOT/NAME)
                continue
            try:
                path.rmdir()
            except OSError:
                break  # not empty (or not ours to remove): what is above it stays too
        if isinstance(err, OSError) and (
            err.errno in (errno.ENOSPC, errno.EDQUOT) or err.filename is None
        ):
            raise DatasetError(
                f"cannot prepare {folder}: {os_error_reason(err)}; nothing was prepared there "
                "(the staging files were removed)"
            ) from None
        raise


def _check_root_writable(folder: Path) -> None:
    """Refuse, naming ROOT, a place where nothing can be written, before staging anything."""
    check_writable("ROOT", folder, folder=True)


# ---------------------------------------------------------------- the three kinds of dataset


def _prepare_official(
    spec: DatasetSpec,
    layout: VariantSpec,
    variant: str | None,
    folder: Path,
    source: Path | None,
    allow_mismatch: bool,
    images: ImageCheck,
    progress: bool,
) -> PreparedDataset:
    _check_owner(folder, spec.name, variant)
    if (folder / MANIFEST_NAME).is_file():
        result = _reuse(folder, layout.counts, spec.title, allow_mismatch, images, progress)
        if source is None:
            return result
        # re-running a finished command stays harmless, but say that the source was not read
        note = f"{folder} is already prepared, so --source was not read"
        return replace(result, warnings=(*result.warnings, note))
    _check_root_writable(folder)
    warnings = _leftovers(folder)
    base, source = _locate(spec, layout, folder, source, warnings)
    if base is not None:
        frame, junk = _scan_layout(base, spec.extensions)
        verified = _verify_counts(frame, layout.counts, spec.title, allow_mismatch, warnings)
        _check_images(frame["path"], full=images != "quick", progress=progress)
    else:
        with _staged_extraction(source, folder, warnings, progress) as staging:
            base = _find_layout(staging, spec, layout, str(source))
            frame, junk = _scan_layout(base, spec.extensions)
            verified = _verify_counts(frame, layout.counts, spec.title, allow_mismatch, warnings)
            _check_staged_images(frame, staging, source, images, progress)
            _move_into(staging, folder, spec.title)
        frame["path"] = _rebased(frame["path"], staging, folder)
    record = {"dataset": spec.name, "variant": variant, "source": str(source), "junk": junk}
    manifest = _write(folder, frame, record, verified=verified, notes=[])
    return PreparedDataset(
        folder.name, manifest, _summarise(frame), verified, False, tuple(warnings)
    )


def _prepare_custom(
    folder: Path, source: Path | None, images: ImageCheck, progress: bool
) -> PreparedDataset:
    _check_owner(folder, "custom", None)
    if source is None:
        if (folder / MANIFEST_NAME).is_file():
            return _reuse(folder, None, "custom", False, images, progress)
        raise DatasetError(
            "custom needs --source: a folder with bounding_box_train/, query/ and "
            "bounding_box_test/ (files named PID_cCAM_*.jpg) or a CSV with columns "
            "path,pid,split and optionally camid"
        )
    _check_root_writable(folder)
    notes: list[str] = []
    if source.is_dir():
        frame, junk = _scan_layout(source, CUSTOM_EXTENSIONS)
    elif source.is_file() and source.suffix.lower() == ".csv":
        frame, junk = _read_custom_csv(source)
        if "camid" not in frame.columns:
            is_query = frame["split"] == "query"
            frame["camid"] = np.where(is_query, QUERY_CAMID, OTHER_CAMID).astype(np.int64)
            notes.append(CAMID_NOTE)
        frame = frame[list(MANIFEST_COLUMNS)]
    elif not source.exists():
        raise DatasetError(f"--source {source} does not exist")
    else:
        raise DatasetError(f"--source {source}: custom takes a folder or a .csv file")
    warnings = [*notes, *_check_custom(frame, source)]
    _check_images(frame["path"], full=images != "quick", progress=progress)
    record = {"dataset": "custom", "variant": None, "source": str(source), "junk": junk}
    record["camera_ids"] = CAMID_NOTE not in notes  # `evaluate` says when the rule was off
    manifest = _write(folder, frame, record, verified=False, notes=notes)
    return PreparedDataset(folder.name, manifest, _summarise(frame), False, False, tuple(warnings))


def _prepare_synthetic(spec: SyntheticSpec, folder: Path, progress: bool) -> PreparedDataset:
    _check_owner(folder, "synthetic", None)
    record = _read_record(folder)
    recorded = record.get("synthetic") if record is not None else None
    if isinstance(recorded, dict) and recorded != asdict(spec):
        # Runs trained on it, and evaluations cached beside them, would silently go stale.
        raise DatasetError(_spec_differs(folder, recorded, spec))
    if recorded is not None:
        try:
            return _reuse(folder, spec.counts(), "synthetic", False, "full", progress)
        except DatasetError:
            pass  # files gone or changed: ours to regenerate, with the same spec
    if record is None and folder.is_dir() and any(folder.iterdir()):
        raise DatasetError(
            f"{folder} exists and was not made by `reidkit prepare synthetic`; "
            "pass another --name or remove it"
        )
    _check_root_writable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(folder)
    try:
        work = staging / folder.name
        generate_synthetic(spec, work, progress=progress)
        frame, _ = _scan_layout(work, (".jpg",))
        # guards the generator: the spec promises these counts
        _verify_counts(frame, spec.counts(), "synthetic", False, [])
        record = {"dataset": "synthetic", "variant": None, "source": None, "junk": 0}
        _write(work, frame, {**record, "synthetic": asdict(spec)}, verified=True, notes=[])
        _replace_folder(work, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedDataset(folder.name, folder / MANIFEST_NAME, _summarise(frame), True, False, ())


# How the command line names a SyntheticSpec field; the others are set from Python only.
SYNTHETIC_OPTIONS = {
    "train_ids": "--train-ids",
    "test_ids": "--test-ids",
    "cameras": "--cameras",
    "seed": "--seed",
}


def _spec_differs(folder: Path, recorded: dict[str, Any], spec: SyntheticSpec) -> str:
    """One line: which options made the dataset in `folder`, which this run asks for, and how
    to re-verify it or get a fresh one."""
    wanted = asdict(spec)
    keys = [key for key in wanted if recorded.get(key) != wanted[key]]
    keys += [key for key in recorded if key not in wanted]

    def options(values: dict[str, Any]) -> str:
        return " ".join(
            f"{SYNTHETIC_OPTIONS.get(key, key)} {values.get(key, '(unset)')}" for key in keys
        )

    return (
        f"{folder} holds a synthetic dataset generated with {options(recorded)}, not "
        f"{options(wanted)}; repeat its options to re-verify it, or pass another --name (or "
        f"delete {folder}) to generate a fresh one"
    )


def _reuse(
    folder: Path,
    counts: PublishedCounts | None,
    title: str,
    allow_mismatch: bool,
    images: ImageCheck,
    progress: bool,
) -> PreparedDataset:
    """Check an existing manifest without reading images (unless asked) and keep it."""
    manifest = folder / MANIFEST_NAME
    frame = read_manifest(manifest)
    missing = [p for p in frame["path"] if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{manifest} lists {len(missing):,} missing file(s), e.g. {missing[0]}; "
            f"delete {manifest} and prepare again"
        )
    warnings = list((_read_record(folder) or {}).get("notes", []))
    verified = counts is not None and _verify_counts(frame, counts, title, allow_mismatch, warnings)
    if images == "recheck":
        _check_images(frame["path"], full=True, progress=progress)
    return PreparedDataset(
        folder.name, manifest, _summarise(frame), verified, True, tuple(warnings)
    )


# ---------------------------------------------------------------- finding an official source


def _locate(
    spec: DatasetSpec,
    layout: VariantSpec,
    folder: Path,
    source: Path | None,
    warnings: list[str],
) -> tuple[Path | None, Path]:
    """(folder holding the split folders, the source it came from); (None, archive) when the
    source is an archive still to be extracted."""
    if source is not None and source.is_dir():
        return _find_layout(source, spec, layout, str(source)), source
    if source is not None and not source.exists():
        raise DatasetError(f"--source {source} does not exist")
    # An earlier run extracted the archive but stopped before the manifest (e.g. a count
    # mismatch): use that extraction rather than extracting again.
    for candidate in (folder / spec.folder, folder):
        if _has_layout(candidate / layout.subfolder):
            if source is not None:
                warnings.append(
                    f"used {candidate}, extracted earlier, instead of {source.name}; "
                    "delete it to extract again"
                )
            return candidate / layout.subfolder, source or candidate
    root = folder.parent
    if source is None:
        for candidate in (root / spec.folder, root / spec.name / spec.folder):
            if _has_layout(candidate / layout.subfolder):
                return candidate / layout.subfolder, candidate
        archives = [root / n for n in spec.archive_names if (root / n).is_file()]
        source = archives[0] if archives else None
    if source is not None:
        return None, source
    missing = "" if root.is_dir() else " (which does not exist)"
    raise DatasetError(
        f"no {spec.title} in {root}{missing}: place {spec.archive} (or its extracted folder "
        f"{spec.folder}/) there, or pass --source; reidkit cannot download it, "
        f"{spec.availability}"
    )


def _has_layout(base: Path) -> bool:
    return base.is_dir() and any((base / sub).is_dir() for sub in SPLIT_FOLDERS.values())


def _find_layout(base: Path, spec: DatasetSpec, layout: VariantSpec, label: str) -> Path:
    """The folder under `base` that holds the split folders: `base` itself or its dataset folder."""
    for candidate in (base / layout.subfolder, base / spec.folder / layout.subfolder):
        if _has_layout(candidate):
            return candidate
    inside = "/".join(p for p in (spec.folder, layout.subfolder) if p)
    raise DatasetError(
        f"{label} does not hold {spec.title}: expected {inside}/bounding_box_train/, query/ and "
        "bounding_box_test/ inside it"
    )


# ---------------------------------------------------------------- datasets given by list files


def _prepare_listed(
    spec: ListDatasetSpec,
    folder: Path,
    source: Path | None,
    allow_mismatch: bool,
    images: ImageCheck,
    progress: bool,
) -> PreparedDataset:
    """MSMT17: a release folder (list files and image folders) or its archive -> manifest.

    An archive is extracted into a staging folder beside ROOT/NAME, read, verified and checked
    there, and moved into ROOT/NAME only then: a count mismatch or a bad image leaves nothing.
    A folder stays where it is and the manifest holds absolute paths into it.
    """
    _check_owner(folder, spec.name, None)
    if (folder / MANIFEST_NAME).is_file():
        result = _reuse(folder, spec.counts, spec.title, allow_mismatch, images, progress)
        if source is None:
            return result
        note = f"{folder} is already prepared, so --source was not read"
        return replace(result, warnings=(*result.warnings, note))
    _check_root_writable(folder)
    warnings = _leftovers(folder)
    source = _find_listed_source(spec, folder, source)
    if source.is_dir():
        base, release = _find_release(source, spec, str(source))
        frame, junk = _scan_lists(base, release, spec)
        verified = _verify_counts(frame, spec.counts, spec.title, allow_mismatch, warnings)
        _check_images(frame["path"], full=images != "quick", progress=progress)
    else:
        with _staged_extraction(source, folder, warnings, progress) as staging:
            base, release = _find_release(staging, spec, str(source))
            frame, junk = _scan_lists(base, release, spec)
            verified = _verify_counts(frame, spec.counts, spec.title, allow_mismatch, warnings)
            _check_staged_images(frame, staging, source, images, progress)
            _move_into(staging, folder, spec.title)
        frame["path"] = _rebased(frame["path"], staging, folder)
    record = {
        "dataset": spec.name,
        "variant": None,
        "source": str(source),
        "junk": junk,
        "release": release.folder,
    }
    manifest = _write(folder, frame, record, verified=verified, notes=[])
    return PreparedDataset(
        folder.name, manifest, _summarise(frame), verified, False, tuple(warnings)
    )


def _find_listed_source(spec: ListDatasetSpec, folder: Path, source: Path | None) -> Path:
    """The folder or archive to read: `source`, else one release found in ROOT/NAME or ROOT."""
    if source is not None:
        if not source.exists():
            raise DatasetError(f"--source {source} does not exist")
        return source
    if _releases_in(folder, spec):  # moved into place by an earlier run that then stopped
        return folder
    root = folder.parent
    found: dict[str, Path] = {}
    for release in spec.releases:
        stem = strip_archive_suffix(release.archive)
        candidates = [root / release.folder, *(root / (stem + s) for s in ARCHIVE_SUFFIXES)]
        for candidate in candidates:
            if candidate.is_file() or _releases_in(candidate, spec):
                found.setdefault(release.folder, candidate)
    if len(found) > 1:
        names = " and ".join(p.name for p in found.values())
        raise DatasetError(f"{root} holds {names}; pass --source to choose one")
    if found:
        return next(iter(found.values()))
    missing = "" if root.is_dir() else " (which does not exist)"
    archives = " or ".join(r.archive for r in spec.releases)
    folders = " or ".join(f"{r.folder}/" for r in spec.releases)
    raise DatasetError(
        f"no {spec.title} in {root}{missing}: place {archives} (or the extracted folder "
        f"{folders}) there, or pass --source; reidkit cannot download it, {spec.availability}"
    )


def _release_folders(base: Path, release: ListRelease) -> dict[str, Path] | None:
    """List file -> the image folder its paths are relative to, if `base` holds `release`.

    Image folders match without regard to case: copies of V2 name them mask_train_V2 too.
    """
    if not (base / "list_train.txt").is_file():
        return None
    try:
        children = {p.name.lower(): p for p in base.iterdir() if p.is_dir()}
    except OSError:
        return None
    folders = {name: children.get(sub.lower()) for name, sub in release.image_folders.items()}
    if any(path is None for path in folders.values()):
        return None
    return folders  # type: ignore[return-value]


def _releases_in(base: Path, spec: ListDatasetSpec) -> list[tuple[Path, ListRelease]]:
    """Every (folder, release) at `base` or in its release-named subfolders."""
    if not base.is_dir():
        return []
    candidates = [base, *(base / r.folder for r in spec.releases)]
    return [
        (candidate, release)
        for candidate in candidates
        for release in spec.releases
        if _release_folders(candidate, release) is not None
    ]


def _find_release(base: Path, spec: ListDatasetSpec, label: str) -> tuple[Path, ListRelease]:
    """The one release folder at or just under `base`, and which release it is."""
    found = _releases_in(base, spec)
    if len(found) == 1:
        return found[0]
    if found:
        names = " and ".join(str(path) for path, _ in found)
        raise DatasetError(f"{label} holds more than one {spec.title}: {names}; pass one")
    layouts = "; ".join(
        f"{r.folder}/ with {', '.join(dict.fromkeys(r.image_folders.values()))}/"
        for r in spec.releases
    )
    raise DatasetError(
        f"{label} does not hold {spec.title}: expected {', '.join(spec.list_files)} and the "
        f"image folders inside {layouts}"
    )


def _scan_lists(
    base: Path, release: ListRelease, spec: ListDatasetSpec
) -> tuple[pd.DataFrame, int]:
    """Rows (absolute path, pid, camid, split) from a release's list files, and the junk count.

    Each line is `relative/path.jpg PID`; the pid is the list's, the camera the file name's
    (`parse_msmt17_camera`). Junk (pid -1, which MSMT17 does not have) is dropped as elsewhere.
    """
    folders = _release_folders(base, release)
    assert folders is not None  # _find_release checked the layout
    rows: list[tuple[str, int, int, str]] = []
    junk = 0
    for split, list_names in spec.lists.items():
        for list_name in list_names:
            path = base / list_name
            if not path.is_file():
                raise DatasetError(
                    f"{base} has no {list_name}; {spec.title} needs {', '.join(spec.list_files)}"
                )
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise DatasetError(f"{path} is not a readable list file ({err})") from None
            prefix = os.path.join(folders[list_name], "")
            start = len(rows)
            for number, line in enumerate(lines, start=1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{path} line {number}"
                if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1], re.ASCII):
                    raise DatasetError(f"{where}: expected 'IMAGE_PATH PID', got {line.strip()!r}")
                parts = fields[0].replace("\\", "/").split("/")
                if fields[0].startswith(("/", "\\")) or _DRIVE.match(fields[0]) or ".." in parts:
                    raise DatasetError(
                        f"{where}: {fields[0]!r} leaves {folders[list_name]}; paths in a list "
                        "file are relative to its image folder"
                    )
                camid = parse_msmt17_camera(parts[-1])
                if camid is None:
                    raise DatasetError(
                        f"{where}: {parts[-1]} has no camera field (PID_INDEX_CAM_..., as in "
                        "0000_000_01_0303morning_0015_0.jpg)"
                    )
                pid = int(fields[1])
                check_id_range("pid", pid, where)
                if pid == JUNK_PID:
                    junk += 1
                    continue
                if pid < JUNK_PID:
                    raise negative_pid_error(pid, where)
                relative = "/".join(p for p in parts if p not in ("", "."))
                rows.append((prefix + relative, pid, camid, split))
            missing = [row[0] for row in rows[start:] if not os.path.isfile(row[0])]
            if missing:
                raise DatasetError(
                    f"{path} names {len(missing):,} image(s) that are not in "
                    f"{folders[list_name]}, e.g. {missing[0]}; is the extraction complete?"
                )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)), junk


def _move_into(staging: Path, folder: Path, title: str) -> None:
    """Move everything in `staging` into `folder`, refusing to replace anything there."""
    entries = sorted(staging.iterdir())
    folder.mkdir(exist_ok=True)
    for entry in entries:
        if (folder / entry.name).exists():
            raise DatasetError(
                f"{folder / entry.name} already exists but is not a complete {title}; "
                "remove it and prepare again"
            )
    for entry in entries:
        os.replace(entry, folder / entry.name)


# ---------------------------------------------------------------- safe extraction


def extract_archive(archive: Path, target: Path, *, progress: bool = False) -> int:
    """Extract a .zip/.tar/.tar.gz into the existing, empty folder `target`; links skipped.

    Refuses, before writing it, any entry with an absolute path or `..`, any symbolic or hard
    link pointing outside the archive's folder, and device or pipe entries. Only regular files
    and folders are written, so a later entry cannot write through a link. Returns the number
    of links inside the archive that were skipped (images are read from regular files only).
    The checks are reidkit's own: tarfile's `filter=` is missing from 3.11 releases before
    3.11.4, and members are streamed to disk here rather than handed to tarfile to extract.
    """
    lowered = archive.name.lower()
    try:
        if lowered.endswith(".zip"):
            return _extract_zip(archive, target, progress)
        if lowered.endswith((".tar", ".tar.gz", ".tgz")):
            return _extract_tar(archive, target, progress)
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DatasetError(f"{archive} is damaged or not a valid archive ({err})") from None
    except NotImplementedError as err:  # e.g. a zip compression method Python lacks
        raise DatasetError(f"{archive}: {err}; unpack it yourself and pass the folder") from None
    except OSError as err:
        raise DatasetError(f"extracting {archive} failed: {err}") from None
    raise DatasetError(f"{archive} is not a .zip, .tar or .tar.gz archive; pass one or a folder")


def _extract_zip(archive: Path, target: Path, progress: bool) -> int:
    links = 0
    made: set[Path] = {target}
    with zipfile.ZipFile(archive) as zf:
        entries = zf.infolist()
        for info in _steps(entries, f"extracting {archive.name}", progress):
            parts = _safe_parts(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):  # a symlink's target is its content
                link = zf.read(info).decode("utf-8", "replace")
                _check_link(info.filename, link, archive, hard=False)
                links += 1
                continue
            if not parts:
                continue
            dest = target.joinpath(*parts)
            if info.is_dir():
                _makedirs(dest, made)
                continue
            if info.flag_bits & 0x1:
                raise DatasetError(
                    f"{archive}: entry {info.filename!r} is encrypted; unpack the archive "
                    "yourself and pass the folder with --source"
                )
            _makedirs(dest.parent, made)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return links


def _extract_tar(archive: Path, target: Path, progress: bool) -> int:
    links = 0
    made: set[Path] = {target}
    # progress follows the compressed bytes read: tar entries are not known up front
    console = Console(stderr=True)
    with (
        rich.progress.open(
            archive,
            "rb",
            description=f"extracting {archive.name}",
            transient=True,
            console=console,
            disable=not draws_bars(progress, console),
        ) as raw,
        tarfile.open(fileobj=raw, mode="r:*") as tar,
    ):
        for member in tar:
            parts = _safe_parts(member.name, archive)
            if member.issym() or member.islnk():
                _check_link(member.name, member.linkname, archive, hard=member.islnk())
                links += 1
                continue
            if not parts:
                continue
            dest = target.joinpath(*parts)
            if member.isdir():
                _makedirs(dest, made)
                continue
            if not member.isreg():
                raise _unsafe(archive, member.name, "is a device or pipe")
            _makedirs(dest.parent, made)
            src = tar.extractfile(member)
            assert src is not None  # regular members always have data
            with src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return links


def _safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    """An entry's path components inside the target; refuses absolute paths and `..`."""
    unified = name.replace("\\", "/")  # zips made on Windows may use backslashes
    parts = unified.split("/")
    if unified.startswith("/") or _DRIVE.match(unified) or ".." in parts:
        raise _unsafe(archive, name, "has an absolute path or '..'")
    return tuple(p for p in parts if p not in ("", "."))


def _check_link(name: str, link: str, archive: Path, *, hard: bool) -> None:
    """Refuse a link that points outside the archive's folder."""
    # a symlink is relative to its own folder; a tar hard link names another entry
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    unified = link.replace("\\", "/")
    resolved = posixpath.normpath(posixpath.join(base, unified))
    if unified.startswith("/") or _DRIVE.match(unified) or resolved.split("/")[0] == "..":
        raise _unsafe(archive, name, f"links to {link!r}, outside the archive's folder")


def _unsafe(archive: Path, name: str, why: str) -> DatasetError:
    return DatasetError(
        f"refusing to extract {archive}: entry {name!r} {why}; nothing was extracted "
        "(is it the official archive?)"
    )


def _makedirs(path: Path, made: set[Path]) -> None:
    if path not in made:  # saves a syscall per file: archives hold tens of thousands
        path.mkdir(parents=True, exist_ok=True)
        made.add(path)


# ---------------------------------------------------------------- reading a layout or CSV


def _scan_layout(base: Path, extensions: tuple[str, ...]) -> tuple[pd.DataFrame, int]:
    """Rows (absolute path, pid, camid, split) of a Market-1501 layout, and the junk count.

    Files with other extensions (the real Market-1501 archive holds Thumbs.db) are ignored;
    junk boxes (pid -1) are dropped; distractors (pid 0) stay.
    """
    rows = []
    junk = 0
    for split, subfolder in SPLIT_FOLDERS.items():
        split_folder = base / subfolder
        if not split_folder.is_dir():
            raise DatasetError(
                f"{base} has no {subfolder}/ folder; the Market-1501 layout needs "
                f"{'/, '.join(SPLIT_FOLDERS.values())}/"
            )
        with os.scandir(split_folder) as entries:
            names = sorted(e.name for e in entries if e.is_file())
        prefix = os.path.join(split_folder, "")
        for filename in names:
            if os.path.splitext(filename)[1].lower() not in extensions:
                continue
            if not _is_utf8(filename):
                # manifest.csv is UTF-8: such a name could not be written into it
                raise DatasetError(
                    f"{split_folder}: the file name {os.fsencode(filename)!r} is not valid "
                    "UTF-8, which manifest.csv needs; rename the file"
                )
            ids = parse_market_name(filename)
            if ids is None:
                raise DatasetError(
                    f"{prefix}{filename}: the name does not start with PID_cCAM (as in "
                    "0002_c1s1_000451_03.jpg); rename or remove the file"
                )
            pid, camid = ids
            check_id_range("pid", pid, f"{prefix}{filename}")
            check_id_range("camid", camid, f"{prefix}{filename}")
            if pid == JUNK_PID:
                junk += 1
                continue
            if pid < JUNK_PID:
                raise negative_pid_error(pid, f"{prefix}{filename}")
            rows.append((prefix + filename, pid, camid, split))
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)), junk


def _is_utf8(name: str) -> bool:
    """False for a name os.scandir decoded with surrogate escapes (bytes that are not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_custom_csv(csv: Path) -> tuple[pd.DataFrame, int]:
    """The CSV's rows with paths resolved against its folder, junk (pid -1) dropped."""
    frame = read_table(csv, camid_optional=True)
    missing = [p for p in frame["path"] if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{csv} lists {len(missing):,} file(s) that do not exist, e.g. {missing[0]} "
            "(relative paths are relative to the CSV's folder)"
        )
    junk = frame["pid"] == JUNK_PID
    return frame[~junk].reset_index(drop=True), int(junk.sum())


def _check_custom(frame: pd.DataFrame, source: Path) -> list[str]:
    """Refuse a custom set that cannot be evaluated; warn where evaluation will skip queries."""
    counts = frame["split"].value_counts()
    for split in ("query", "gallery"):
        if counts.get(split, 0) == 0:
            raise DatasetError(f"{source} has no {split} images; a dataset needs query and gallery")
    warnings = []
    if counts.get("train", 0) == 0:
        warnings.append("no train images: this dataset can be evaluated on, not trained on")
    gallery = frame[frame["split"] == "gallery"]
    gallery_cameras: dict[int, set[int]] = {}
    for pid, camid in zip(gallery["pid"], gallery["camid"], strict=True):
        gallery_cameras.setdefault(int(pid), set()).add(int(camid))
    query = frame[frame["split"] == "query"]
    unmatched = sum(
        1
        for pid, camid in zip(query["pid"], query["camid"], strict=True)
        if not gallery_cameras.get(int(pid), set()) - {int(camid)}
    )
    if unmatched:
        warnings.append(
            f"{unmatched:,} of {len(query):,} queries have no gallery image of their identity "
            "from another camera; evaluation skips them"
        )
    repeated = int(frame["path"].duplicated().sum())
    if repeated:
        warnings.append(f"{repeated:,} rows repeat an image listed before them")
    return warnings


# ---------------------------------------------------------------- checks and output


def _verify_counts(
    frame: pd.DataFrame,
    counts: PublishedCounts,
    title: str,
    allow_mismatch: bool,
    warnings: list[str],
) -> bool:
    """True when the counts match; a mismatch raises, or with `allow_mismatch` warns."""
    by_split = {s.split: s for s in _summarise(frame)}
    rows = [
        ("train identities", counts.train_ids, by_split["train"].ids),
        ("train images", counts.train_images, by_split["train"].images),
        ("query identities", counts.query_ids, by_split["query"].ids),
        ("query images", counts.query_images, by_split["query"].images),
        ("gallery images", counts.gallery_images, by_split["gallery"].images),
        ("cameras", counts.cameras, int(frame["camid"].nunique())),
    ]
    differ = [
        f"{what} {found:,} (published {expected:,})"
        for what, expected, found in rows
        if expected != found
    ]
    if not differ:
        return True
    message = f"{title} counts differ from the published ones: {'; '.join(differ)}"
    if not allow_mismatch:
        raise CountMismatchError(
            f"{message}; check the source, or pass --allow-mismatch to accept it", rows
        )
    warnings.append(f"{message}; accepted (--allow-mismatch)")
    return False


# Threads, not processes: Pillow releases the GIL while it decodes, and threads start at once
# and share the path list. A few suffice to keep a disk and two to eight cores busy.
CHECK_THREADS = min(8, os.cpu_count() or 1)
_SERIAL_BELOW = 64  # a pool costs more than it saves on a handful of images


def _check_images(
    paths: Iterable[str],
    *,
    full: bool,
    progress: bool,
    shown_as: Callable[[str], str] = str,
) -> None:
    """Decode every image fully (or, without `full`, read its header), in parallel.

    The first bad image in the manifest's order fails with its path (as `shown_as` writes it:
    an image in a staging folder is named by its archive entry) and what is wrong.
    """
    paths = list(paths)
    what = "decoding" if full else "checking headers of"
    threads = 1 if len(paths) < _SERIAL_BELOW else CHECK_THREADS
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    try:
        # map keeps the input order, so the image reported does not depend on thread timing
        problems = (
            pool.map(_image_problem, paths, itertools.repeat(full), chunksize=32)
            if pool is not None
            else (_image_problem(path, full) for path in paths)
        )
        for path, problem in zip(
            paths,
            _steps(problems, f"{what} {len(paths):,} images", progress, len(paths)),
            strict=True,
        ):
            if problem is not None:
                raise DatasetError(
                    f"{shown_as(path)} {problem}; replace or remove it and prepare again"
                )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _image_problem(path: str, full: bool) -> str | None:
    """What is wrong with one image, or None. A full decode finds a JPEG cut short."""
    try:
        with Image.open(path) as image:
            if full:
                image.load()
            width, height = image.size
    except Exception as err:  # PIL reports bad data with many exception types
        return f"is not a readable image ({err})"
    if width < 1 or height < 1:
        return "has no pixels"
    return None


def _summarise(frame: pd.DataFrame) -> tuple[SplitSummary, ...]:
    summaries = []
    for split in SPLITS:
        rows = frame[frame["split"] == split]
        summaries.append(
            SplitSummary(split, int(rows["pid"].nunique()), len(rows), int(rows["camid"].nunique()))
        )
    return tuple(summaries)


def _write(
    folder: Path, frame: pd.DataFrame, record: dict[str, Any], *, verified: bool, notes: list[str]
) -> Path:
    """Write dataset.json, then manifest.csv (each to a temporary name, then renamed).

    Paths under `folder` are written relative to it, others absolute.
    """
    folder.mkdir(parents=True, exist_ok=True)
    prefix = os.path.join(os.path.abspath(folder), "")
    paths = [
        p[len(prefix) :].replace(os.sep, "/") if p.startswith(prefix) else p for p in frame["path"]
    ]
    out = frame.assign(path=paths)[list(MANIFEST_COLUMNS)]
    full_record = {**record, "verified": verified, "notes": notes, "reidkit": __version__}
    text = out.to_csv(index=False, lineterminator="\n")
    for row, path in enumerate(out["path"], start=2):  # both texts can be written, or neither
        if not _is_utf8(path):
            raise DatasetError(
                f"{os.fsencode(path)!r} (manifest line {row}) is not valid UTF-8, which "
                "manifest.csv needs; rename the file"
            )
    write_text(folder / RECORD_NAME, json.dumps(full_record, indent=2) + "\n")
    manifest = folder / MANIFEST_NAME
    write_text(manifest, text)
    return manifest


# ---------------------------------------------------------------- folders and records


def _folder_name(name: str | None, default: str) -> str:
    if name is None:
        return default
    if not name or name in (".", "..") or name.startswith(".") or re.search(r"[/\\]", name):
        raise DatasetError(f"--name {name!r} must be a plain folder name, e.g. market1501")
    return name


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_owner(folder: Path, dataset: str, variant: str | None) -> None:
    """Refuse to overwrite a folder prepared as another dataset."""
    record = _read_record(folder)
    if record is None:
        return
    found = (record.get("dataset"), record.get("variant"))
    if found != (dataset, variant):
        held = " ".join(str(v) for v in found if v)
        wanted = " ".join(v for v in (dataset, variant) if v)
        raise DatasetError(f"{folder} holds a prepared {held}, not {wanted}; pass another --name")


def _staging(folder: Path) -> Path:
    """A fresh folder beside `folder`, renamed into place only when complete."""
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=_PARTIAL, dir=folder.parent))


@contextmanager
def _staged_extraction(
    source: Path, folder: Path, warnings: list[str], progress: bool
) -> Iterator[Path]:
    """`source` extracted into a staging folder beside `folder`, removed on the way out.

    The caller reads, verifies and checks it there and moves it into ROOT/NAME only then, so
    a count mismatch or a bad image leaves nothing in ROOT.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(folder)
    try:
        links = extract_archive(source, staging, progress=progress)
        if links:
            warnings.append(f"skipped {links:,} link(s) inside {source.name}: images are files")
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_staged_images(
    frame: pd.DataFrame, staging: Path, source: Path, images: ImageCheck, progress: bool
) -> None:
    """`_check_images` on extracted files, a bad one named by its entry in the archive."""
    staged = os.path.join(staging, "")
    _check_images(
        frame["path"],
        full=images != "quick",
        progress=progress,
        shown_as=lambda p: f"{source.name}: entry {p[len(staged) :]}",
    )


def _rebased(paths: pd.Series, staging: Path, folder: Path) -> list[str]:
    """Paths under the (moved) staging folder, as they now lie under `folder`."""
    old, new = os.path.join(staging, ""), os.path.join(folder, "")
    return [new + p[len(old) :] for p in paths]


def _leftovers(folder: Path) -> list[str]:
    stale = sorted(folder.parent.glob(f".{folder.name}-*{_PARTIAL}"))
    return [f"{path} is left from an interrupted prepare; delete it" for path in stale]


def _replace_folder(new: Path, folder: Path) -> None:
    """Move `new` to `folder`, replacing an old one; either the old or the new is in place."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}-{os.getpid()}.old")
        os.replace(folder, old)
    os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _steps(items: Iterable, description: str, progress: bool, total: int | None = None) -> Iterable:
    console = Console(stderr=True)
    return rich.progress.track(
        items,
        description=description,
        total=len(items) if total is None else total,
        transient=True,
        console=console,
        disable=not draws_bars(progress, console),
    )
