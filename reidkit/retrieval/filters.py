"""Gallery metadata filters: one `GalleryFilter`, as a row mask (FAISS, exact) or Milvus expression.

A filter keeps the gallery rows whose camera is one of `cameras`, whose frame number or
timestamp lies in [after, before), and whose path starts with `path_prefix`; every part left
out keeps everything. The two forms select exactly the same rows (tests hold them together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from reidkit.errors import ReidkitError

UNKNOWN = -1  # an integer field whose value a gallery row does not know
# The metadata every gallery row carries (-1 where unknown). `frame` comes from names that give
# one (Market-1501 `c1s1_000451`, DukeMTMC-reID `f0046182`) or from a --meta CSV; `timestamp`
# (milliseconds since 1970-01-01 UTC) only from a --meta CSV.
META_FIELDS: tuple[str, ...] = ("path", "pid", "camid", "frame", "timestamp")
INT_FIELDS: tuple[str, ...] = ("pid", "camid", "frame", "timestamp")


class GalleryFilterError(ReidkitError):
    """A filter that cannot apply: a bad value, or a field the gallery does not carry."""


@dataclass(frozen=True)
class TimeBound:
    """One end of a time range: a frame number or a timestamp in milliseconds (UTC)."""

    field: str  # "frame" or "timestamp"
    value: int


def parse_time(text: str, option: str = "time") -> TimeBound:
    """`--after` / `--before`: a whole number is a frame number; an ISO 8601 date and time
    (`2024-05-01T10:00`, `2024-05-01 10:00:30+02:00`) a timestamp. A time without a zone is
    read as UTC, as `--meta` timestamps are, so the two always compare alike."""
    text = str(text).strip()
    if text.lstrip("-").isdigit():
        return TimeBound("frame", int(text))
    return TimeBound("timestamp", parse_timestamp(text, option))


def parse_timestamp(value: object, where: str) -> int:
    """Milliseconds since 1970-01-01 UTC from an ISO 8601 date-time or a number of seconds."""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise GalleryFilterError(f"{where}: timestamp {value!r} is not a finite number")
        return round(float(value) * 1000)
    text = str(value).strip()
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise GalleryFilterError(
            f"{where}: {text!r} is neither a frame number nor an ISO 8601 date and time; write "
            "e.g. 2024-05-01T10:00:00 (UTC unless a zone is given) or a whole frame number"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def parse_cameras(text: str) -> tuple[int, ...]:
    """`--camera 3,4,5` (or `3-5`) -> (3, 4, 5)."""
    cameras: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            if dash and low:
                cameras.extend(range(int(low), int(high) + 1))
            else:
                cameras.append(int(part))
        except ValueError:
            raise GalleryFilterError(
                f"--camera {text!r}: give camera numbers as the file names write them, "
                "separated by commas (3,4,5) or as a range (3-5)"
            ) from None
    return tuple(sorted(set(cameras)))


@dataclass(frozen=True)
class GalleryFilter:
    """Which gallery rows a search may return; None everywhere keeps them all.

    `after` is inclusive and `before` exclusive, so consecutive windows never share a row.
    Both bounds of a range must be of one kind (frames or timestamps).
    """

    cameras: tuple[int, ...] | None = None
    after: TimeBound | None = None
    before: TimeBound | None = None
    path_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.after and self.before and self.after.field != self.before.field:
            raise GalleryFilterError(
                f"--after is a {self.after.field} and --before a {self.before.field}; give both "
                "as frame numbers or both as dates and times"
            )
        if self.cameras is not None and not self.cameras:
            raise GalleryFilterError("--camera names no camera; give e.g. --camera 3,4,5")

    @property
    def is_empty(self) -> bool:
        return self == GalleryFilter()

    def fields(self) -> tuple[str, ...]:
        """The metadata fields this filter reads."""
        needed = []
        if self.cameras is not None:
            needed.append("camid")
        for bound in (self.after, self.before):
            if bound is not None and bound.field not in needed:
                needed.append(bound.field)
        if self.path_prefix is not None:
            needed.append("path")
        return tuple(needed)

    def check_fields(self, available: tuple[str, ...] | list[str], gallery: str) -> None:
        """Refuse a filter on a field that no row of the gallery carries."""
        for name in self.fields():
            if name in available:
                continue
            how = {
                "camid": "names in the PID_cCAM layout or a --meta CSV with a camid column",
                "frame": "names that carry frames (Market-1501, DukeMTMC-reID) or a --meta "
                "CSV with a frame column",
                "timestamp": "a --meta CSV with a timestamp column",
                "path": "paths",
            }[name]
            raise GalleryFilterError(
                f"gallery {gallery} has no {name} values, so it cannot be filtered by "
                f"{_option_of(name)}; extract it again from {how}"
            )

    def mask(self, meta: pd.DataFrame) -> np.ndarray:
        """(N,) bool: the rows of `meta` (columns as META_FIELDS) that the filter keeps."""
        keep = np.ones(len(meta), dtype=bool)
        if self.cameras is not None:
            keep &= meta["camid"].isin(self.cameras).to_numpy()
        for bound, low in ((self.after, True), (self.before, False)):
            if bound is None:
                continue
            values = meta[bound.field].to_numpy(np.int64)
            known = values != UNKNOWN  # a row without a time is outside every time range
            keep &= known & ((values >= bound.value) if low else (values < bound.value))
        if self.path_prefix is not None:
            keep &= meta["path"].astype(str).str.startswith(self.path_prefix).to_numpy()
        return keep

    def expression(self) -> str:
        """The same filter as a Milvus boolean expression ("" keeps every row)."""
        terms = []
        if self.cameras is not None:
            terms.append(f"camid in [{', '.join(str(c) for c in self.cameras)}]")
        for bound, op in ((self.after, ">="), (self.before, "<")):
            if bound is not None:
                terms.append(f"({bound.field} != {UNKNOWN} and {bound.field} {op} {bound.value})")
        if self.path_prefix is not None:
            terms.append(_prefix_expression(self.path_prefix))
        return " and ".join(terms)


def _option_of(field: str) -> str:
    return {
        "camid": "--camera",
        "frame": "--after/--before frame numbers",
        "timestamp": "--after/--before dates and times",
        "path": "--path-prefix",
    }[field]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _prefix_expression(prefix: str) -> str:
    """`path` starts with `prefix`, as a range: prefix <= path < the next string of that length.

    Not `like "prefix%"`: LIKE reads `_` and `%` in the prefix as wildcards, and folder names
    carry underscores (`cam_3/`); Milvus and Milvus Lite have no escape for them. Strings
    compare by code point (UTF-8 bytes order the same way), so the range is exact.
    """
    if not prefix:
        return 'path >= ""'
    head = prefix.rstrip(chr(0x10FFFF))
    if not head:  # only the last code point: every longer string is inside
        return f"path >= {_quote(prefix)}"
    following = ord(head[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters: skip to the next one
        following = 0xE000
    upper = head[:-1] + chr(following)
    return f"(path >= {_quote(prefix)} and path < {_quote(upper)})"


def filter_from_options(
    camera: str | None = None,
    after: str | None = None,
    before: str | None = None,
    path_prefix: str | None = None,
) -> GalleryFilter | None:
    """The filter that `search --camera --after --before --path-prefix` ask for (None: none)."""
    where = GalleryFilter(
        cameras=parse_cameras(camera) if camera is not None else None,
        after=parse_time(after, "--after") if after is not None else None,
        before=parse_time(before, "--before") if before is not None else None,
        path_prefix=path_prefix,
    )
    return None if where.is_empty else where
