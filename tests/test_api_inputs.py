"""The Python API on inputs a script may give: one image instead of a list, an image with no
pixels, a decompression bomb; each embeds or is refused in one line naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidkit.api import load_model
from reidkit.errors import DatasetError


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def query(tiny_root) -> Path:
    return sorted((tiny_root / "tiny" / "query").glob("*.jpg"))[0]


def test_one_image_embeds_as_one_row_whatever_its_kind(model, query: Path):
    expected = model.embed([query])
    assert expected.shape[0] == 1
    with Image.open(query) as image:
        pil = image.convert("RGB")
    for one in (str(query), query, pil, np.asarray(pil)):
        np.testing.assert_allclose(model.embed(one), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (np.zeros((0, 0, 3), np.uint8), r"an image array has no pixels \(0x0\)"),
        (np.zeros((5, 0, 3), np.uint8), r"has no pixels \(0x5\)"),
        (Image.new("RGB", (0, 0)), "a PIL image has no pixels"),
    ],
)
def test_an_image_without_pixels_is_refused_not_given_a_feature(model, item, message):
    with pytest.raises(DatasetError, match=message):
        model.embed([item])


def test_something_that_is_not_images_says_what_to_give(model):
    with pytest.raises(DatasetError, match="one or a list of them; got a int"):
        model.embed(3)


def test_a_decompression_bomb_is_refused_naming_its_path(model, tmp_path, monkeypatch):
    bomb = tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(bomb)
    # PIL refuses images above 2 x MAX_IMAGE_PIXELS: a 15000x15000 image at the default
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DatasetError, match=f"{bomb} is not a readable image .*exceeds limit"):
        model.embed([bomb])
