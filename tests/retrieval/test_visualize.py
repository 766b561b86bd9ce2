"""Montages: size, border colours by pid, atomic writes; the CMC curve file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidkit.errors import DatasetError
from reidkit.retrieval.visualize import (
    BORDER,
    GAP,
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    QUERY_GAP,
    TEXT_HEIGHT,
    UNKNOWN_COLOUR,
    MontageRow,
    save_cmc_curve,
    save_ranked_montage,
    save_ranked_montage_grid,
    tile_origin,
)


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate([(0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (30 + i, 70), colour).save(path)  # odd sizes: resizing is exercised
        paths.append(path)
    return paths


def border_pixel(image, row, column, size=(128, 64)):
    x, y = tile_origin(row, column, size)
    return image.getpixel((x + 1, y + 1)), image.getpixel((x + size[1] + BORDER, y + 1))


def test_montage_size_and_border_colours(tmp_path, images):
    out = save_ranked_montage(
        images[0],
        images[1:],
        tmp_path / "m.png",
        query_pid=5,
        ranked_pids=[5, 7, 5],
        scores=[0.9, 0.8, 0.7],
    )
    montage = Image.open(out)
    tile_w, tile_h = 64 + 2 * BORDER, 128 + 2 * BORDER + TEXT_HEIGHT
    assert montage.size == (GAP + tile_w + QUERY_GAP + 3 * (tile_w + GAP), GAP + tile_h + GAP)
    for column, colour in [(1, MATCH_COLOUR), (2, MISMATCH_COLOUR), (3, MATCH_COLOUR)]:
        # both the left and the right border strip carry the colour
        assert border_pixel(montage, 0, column) == (colour, colour)
    # the image itself is inside the border, resized
    x, y = tile_origin(0, 2)
    assert montage.getpixel((x + BORDER + 32, y + BORDER + 64)) == (0, 255, 255)


def test_unknown_pids_are_grey(tmp_path, images):
    out = save_ranked_montage(images[0], images[1:3], tmp_path / "m.png", ranked_pids=[1, 2])
    montage = Image.open(out)
    for column in (1, 2):  # no query pid: nothing to compare with
        assert border_pixel(montage, 0, column)[0] == UNKNOWN_COLOUR
    out = save_ranked_montage(images[0], images[1:3], tmp_path / "n.png", query_pid=1)
    assert border_pixel(Image.open(out), 0, 1)[0] == UNKNOWN_COLOUR


def test_grid_has_one_row_per_query(tmp_path, images):
    rows = [
        MontageRow(images[0], images[1:4], 1, [1, 2, 2]),
        MontageRow(images[1], images[2:3], 3, [2]),
    ]
    size = (64, 32)
    montage = Image.open(save_ranked_montage_grid(rows, tmp_path / "g.png", size=size))
    tile_h = 64 + 2 * BORDER + TEXT_HEIGHT
    assert montage.size[1] == GAP + 2 * (tile_h + GAP)
    assert border_pixel(montage, 1, 1, size)[0] == MISMATCH_COLOUR
    assert border_pixel(montage, 0, 1, size)[0] == MATCH_COLOUR
    # the second row is shorter: where its second tile would be is background
    x, y = tile_origin(1, 2, size)
    assert montage.getpixel((x + 1, y + 1)) == (255, 255, 255)


def test_montage_write_is_atomic(tmp_path, images, monkeypatch):
    save_ranked_montage(images[0], images[1:], tmp_path / "m.png")
    written = [p.name for p in tmp_path.iterdir() if not p.name.startswith("img")]
    assert written == ["m.png"]
    # a failure while writing leaves the previous file and no temporary
    before = (tmp_path / "m.png").read_bytes()

    def broken_save(self, fp, format=None, **params):  # noqa: A002 - PIL's own name
        Path(fp).write_bytes(b"half a png")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        save_ranked_montage(images[0], images[1:2], tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_image_is_named(tmp_path, images):
    with pytest.raises(DatasetError, match="nope.jpg"):
        save_ranked_montage(images[0], [tmp_path / "nope.jpg"], tmp_path / "m.png")


def test_mismatched_pid_list_is_refused(tmp_path, images):
    with pytest.raises(ValueError, match="ranked_pids has 1 entries for 2"):
        save_ranked_montage(images[0], images[1:3], tmp_path / "m.png", ranked_pids=[1])


def test_cmc_curve_is_a_png(tmp_path):
    out = save_cmc_curve(np.linspace(0.8, 1.0, 50), tmp_path / "cmc.png", "PCB+CSALR")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (500, 350)
    assert [p.name for p in tmp_path.iterdir()] == ["cmc.png"]


def test_pictures_follow_the_umask(tmp_path, images):
    previous = os.umask(0o027)
    try:
        montage = save_ranked_montage(images[0], images[1:2], tmp_path / "m.png")
        curve = save_cmc_curve(np.linspace(0.5, 1.0, 5), tmp_path / "cmc.png", "x")
    finally:
        os.umask(previous)
    # not mkstemp's owner-only 0600: others on a shared machine may look at them
    assert stat.S_IMODE(montage.stat().st_mode) == 0o640
    assert stat.S_IMODE(curve.stat().st_mode) == 0o640


def test_oversized_image_is_named_not_a_traceback(tmp_path, images, monkeypatch):
    # 30x70 pixels is more than twice this limit: PIL raises DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(
        DatasetError, match=r"cannot open image .*img0\.png for the montage .*decompression bomb"
    ):
        save_ranked_montage(images[0], images[1:2], tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


def test_the_attention_figure_reads_at_its_size():
    from reidkit.retrieval.visualize import attention_figure

    image = np.full((96, 32, 3), 128, np.uint8)  # a 3:1 pedestrian crop
    rng = np.random.default_rng(0)
    maps = {}
    for label in ("full softmax(QK^T)", "CSALR A_nm A_mm^-1 B"):
        weights = rng.random((2, 24, 8))
        maps[label] = weights / weights.sum(axis=(1, 2), keepdims=True)
    figure = attention_figure(image, [(3, 2), (20, 5)], maps, errors=[0.01234, 0.5], title="t")
    figure.canvas.draw()
    image_axes = [ax for ax in figure.axes if ax.images]
    assert len(image_axes) == 1 + 2 * 2
    # titles at least 8 points (they were 6), the numbers under the maps too
    assert min(ax.title.get_fontsize() for ax in image_axes) >= 8
    assert image_axes[2].get_xlabel() == "TV to full 0.012"
    assert image_axes[1].get_xlabel() == f"peak {max(m[0].max() for m in maps.values()):.3g}"
    # one colour bar says what the colours mean
    (bar,) = [ax for ax in figure.axes if ax.get_ylabel() == "weight / the point's peak"]
    assert bar not in image_axes
    # the panels fill the figure's height: no empty band under them (it was a third)
    height = figure.bbox.height
    for ax in image_axes:
        box = ax.get_window_extent()
        assert box.height > 0.7 * height and box.y0 < 0.12 * height
