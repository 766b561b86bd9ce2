"""What a gallery row says about its image: pid and camera, frame and time, from names or a CSV.

File names give pid and camera (`PID_cCAM`) and, where the dataset writes one, a frame number:
Market-1501 `0002_c1s1_000451_03.jpg` (frame 451 of sequence 1), DukeMTMC-reID
`0001_c2_f0046182.jpg` (frame 46182). `--meta CSV` gives any of them for any gallery, and a
timestamp, by image path; its values win over the names'.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from reidkit.errors import DatasetError
from reidkit.retrieval.filters import INT_FIELDS, UNKNOWN, GalleryFilterError, parse_timestamp

_FRAME_PATTERNS = (
    re.compile(r"-?\d+_c\d+s\d+_(\d+)", re.ASCII),  # Market-1501: PID_cCsS_FRAME_BOX
    re.compile(r"-?\d+_c\d+_f(\d+)", re.ASCII),  # DukeMTMC-reID: PID_cC_fFRAME
)
META_CSV_COLUMNS = ("path", *INT_FIELDS)


def frame_from_name(name: str) -> int:
    """The frame number a Market-1501 or DukeMTMC-reID file name carries, else -1."""
    for pattern in _FRAME_PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match[1])
    return UNKNOWN


def gallery_metadata(rows: pd.DataFrame, meta_csv: Path | None = None) -> pd.DataFrame:
    """path, pid, camid, frame, timestamp for every row (rows: path, pid, camid), in order.

    Frames come from the names; a `meta_csv` (column `path`, and any of pid, camid, frame,
    timestamp) overrides by path: absolute, or relative to the CSV's folder. A timestamp is
    an ISO 8601 date and time (UTC unless it names a zone) or seconds since 1970.
    """
    meta = pd.DataFrame(
        {
            "path": rows["path"].astype(str).to_numpy(),
            "pid": rows["pid"].to_numpy(np.int64),
            "camid": rows["camid"].to_numpy(np.int64),
            "frame": np.array([frame_from_name(Path(p).name) for p in rows["path"]], np.int64),
            "timestamp": np.full(len(rows), UNKNOWN, dtype=np.int64),
        }
    )
    if meta_csv is not None:
        _apply_meta_csv(meta, Path(meta_csv).expanduser())
    return meta


def _apply_meta_csv(meta: pd.DataFrame, csv: Path) -> None:
    if not csv.is_file():
        raise DatasetError(f"--meta {csv} does not exist; give a CSV with a path column")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"--meta {csv} is not a readable CSV ({err})") from None
    unknown = [c for c in table.columns if c not in META_CSV_COLUMNS]
    if "path" not in table.columns or unknown:
        what = f"has unknown column(s) {', '.join(unknown)}" if unknown else "has no path column"
        raise DatasetError(
            f"--meta {csv} {what}; its columns are path and any of {', '.join(INT_FIELDS)}"
        )
    where = {str(Path(p).resolve()): i for i, p in enumerate(meta["path"])}
    matched = 0
    for line, record in enumerate(table.to_dict("records"), start=2):
        path = Path(record["path"]).expanduser()
        row = where.get(str((path if path.is_absolute() else csv.parent / path).resolve()))
        if row is None:
            continue  # a CSV may describe more images than this gallery holds
        matched += 1
        for name in INT_FIELDS:
            text = str(record.get(name, "")).strip()
            if text:
                meta.loc[row, name] = _field_value(name, text, f"--meta {csv} line {line}")
    if matched == 0:
        raise DatasetError(
            f"--meta {csv} names none of the {len(meta):,} images; its paths must be the "
            f"images' paths, absolute or relative to the CSV's folder (e.g. {meta['path'][0]})"
        )


def _field_value(name: str, text: str, where: str) -> int:
    if name == "timestamp":
        try:
            return parse_timestamp(text, where)
        except GalleryFilterError as err:
            raise DatasetError(str(err)) from None
    try:
        value = int(text)
    except ValueError:
        raise DatasetError(f"{where}: {name} {text!r} is not a whole number") from None
    if value < UNKNOWN:
        raise DatasetError(f"{where}: {name} {value} is negative (-1 means unknown)")
    return value
