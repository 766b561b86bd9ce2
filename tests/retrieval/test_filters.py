"""Gallery filters: parsing what the options say, and which rows a filter keeps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reidkit.retrieval.filters import (
    GalleryFilter,
    GalleryFilterError,
    TimeBound,
    filter_from_options,
    parse_cameras,
    parse_time,
)

# 2024-05-01T10:00:00Z in milliseconds since 1970, worked out by hand: 19844 days to
# 2024-05-01 (54 years with 13 leap days to 2024-01-01 = 19723 days, plus 31+29+31+30 = 121),
# 86,400 s a day, plus 10 hours.
TEN_OCLOCK_MS = (19844 * 86_400 + 10 * 3600) * 1000


def test_a_whole_number_is_a_frame_and_a_date_a_timestamp_read_as_utc():
    assert parse_time("451") == TimeBound("frame", 451)
    assert parse_time("2024-05-01T10:00") == TimeBound("timestamp", TEN_OCLOCK_MS)
    assert parse_time("2024-05-01 10:00:00+00:00") == TimeBound("timestamp", TEN_OCLOCK_MS)
    # a zone is honoured: 12:00 at +02:00 is 10:00 UTC
    assert parse_time("2024-05-01T12:00:00+02:00") == TimeBound("timestamp", TEN_OCLOCK_MS)


def test_a_time_that_is_neither_says_what_to_write():
    with pytest.raises(GalleryFilterError, match="--after: 'ten past' is neither a frame"):
        parse_time("ten past", "--after")


def test_cameras_are_a_list_or_a_range():
    assert parse_cameras("3,4,5") == (3, 4, 5)
    assert parse_cameras("5-3") == ()  # an empty range names no camera...
    assert parse_cameras("3-5") == (3, 4, 5)
    assert parse_cameras("6, 1,1") == (1, 6)
    with pytest.raises(GalleryFilterError, match="--camera 'c3'"):
        parse_cameras("c3")
    with pytest.raises(GalleryFilterError, match="names no camera"):  # ...and is refused
        GalleryFilter(cameras=parse_cameras("5-3"))


def test_bounds_of_two_kinds_are_refused():
    with pytest.raises(GalleryFilterError, match="--after is a frame and --before a timestamp"):
        filter_from_options(after="10", before="2024-05-01T10:00")


def test_no_option_is_no_filter():
    assert filter_from_options() is None
    assert filter_from_options(camera="2") == GalleryFilter(cameras=(2,))


META = pd.DataFrame(
    {
        "path": ["/g/cam_3/a.jpg", "/g/camX3/b.jpg", "/g/cam_30/c.jpg", "/g/cam_3/d.jpg", ""],
        "pid": [1, 1, 2, 2, 3],
        "camid": [3, 3, 4, 5, -1],
        "frame": [100, 200, 300, -1, 150],
        "timestamp": [-1, -1, -1, -1, -1],
    }
)


@pytest.mark.parametrize(
    ("where", "kept"),
    [
        (GalleryFilter(cameras=(3, 5)), [0, 1, 3]),
        # after is inclusive, before exclusive; a row without a frame is in no window
        (GalleryFilter(after=TimeBound("frame", 150)), [1, 2, 4]),
        (GalleryFilter(before=TimeBound("frame", 200)), [0, 4]),
        (GalleryFilter(after=TimeBound("frame", 100), before=TimeBound("frame", 300)), [0, 1, 4]),
        # a prefix is a prefix: "_" is no wildcard, "cam_30" does not start with "cam_3/"
        (GalleryFilter(path_prefix="/g/cam_3/"), [0, 3]),
        (GalleryFilter(cameras=(3,), path_prefix="/g/cam_3/"), [0]),
    ],
)
def test_mask_keeps_exactly_the_rows_the_filter_names(where, kept):
    assert list(np.flatnonzero(where.mask(META))) == kept


def test_a_filter_on_a_field_no_row_knows_names_the_field_and_the_fix():
    where = GalleryFilter(after=TimeBound("timestamp", TEN_OCLOCK_MS))
    with pytest.raises(GalleryFilterError) as err:
        where.check_fields(("path", "pid", "camid", "frame"), "runs/index")
    message = str(err.value)
    assert message.startswith("gallery runs/index has no timestamp values")
    assert "--after/--before dates and times" in message and "--meta CSV" in message
    GalleryFilter(after=TimeBound("frame", 3)).check_fields(("frame",), "runs/index")  # fine
