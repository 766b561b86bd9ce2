"""`attention_maps`: the paper's Figure 4 shows the maps the modules really apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reidkit.data.loading import build_transform, manifest_path, read_manifest
from reidkit.engine.attention_maps import QueryPoint, attention_maps
from reidkit.engine.checkpoint import load_model
from reidkit.engine.train import fit
from reidkit.errors import ConfigError, DatasetError
from reidkit.models import reference
from reidkit.retrieval.visualize import save_attention_figure


@pytest.fixture(scope="module")
def image(tiny_root) -> Path:
    frame = read_manifest(manifest_path(tiny_root, "tiny"))
    return Path(frame[frame["split"] == "query"]["path"].iloc[0])


@pytest.fixture(scope="module")
def sa_checkpoint(tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sa") / "run"
    return fit(tiny_config("train.epochs=1", "attention.kind=sa"), out, progress=False)


def module_input(checkpoint: Path, image: Path, stage: int):
    """The module after `stage`, and its input for `image`, captured independently."""
    net, state = load_model(checkpoint)
    data = state.config.data
    with Image.open(image) as pil:
        x = build_transform(data.height, data.width, train=False)(pil.convert("RGB"))[None]
    module = net.attention[str(stage)]
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    return module, seen[0]


def test_csalr_maps_are_the_literal_reconstruction_the_module_applies(tiny_checkpoint, image):
    maps = attention_maps(tiny_checkpoint, image, stage=2, group=1, points=[(10.0, 8.0)])
    module, x = module_input(tiny_checkpoint, image, 2)
    assert maps.kind == "CSALR" and maps.stage == 2 and maps.group == 1
    h, w = x.shape[-2:]
    (row, col) = maps.points[0]
    assert (row, col) == (int(10 * h / 96), int(8 * w / 32))
    with torch.no_grad():
        q, k = module.query(x), module.key(x)  # plain convs: an independent path to Q and K
        q, k = q.unflatten(1, (module.groups, -1)), k.unflatten(1, (module.groups, -1))
        a_nm, a_mm, b = reference.csalr_blocks(q.double(), k.double(), module.grid, 2.0)
        literal = (a_nm @ torch.linalg.inv(a_mm) @ b)[0, 1, row * w + col].view(h, w)
        full = torch.softmax(q.double().flatten(3).mT @ k.double().flatten(3), -1)
        full = full[0, 1, row * w + col].view(h, w)
    shown = maps.maps["CSALR A_nm A_mm^-1 B"][0]
    # float32 module against float64 literal: about 1e-5 relative, far below what the figure shows
    np.testing.assert_allclose(shown, literal.numpy(), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(maps.maps["full softmax(QK^T)"][0], full.numpy(), rtol=1e-4)
    assert shown.sum() == pytest.approx(1.0, abs=1e-6)
    expected_error = 0.5 * np.abs(shown - full.numpy()).sum()
    assert maps.errors[0] == pytest.approx(expected_error, rel=1e-4)


def test_the_shown_map_applied_to_v_is_the_modules_output(tiny_checkpoint, image):
    # Every position as a point: the full reconstructed map, applied to V, fused, must be
    # what the module's fast path computes for that image.
    module, x = module_input(tiny_checkpoint, image, 1)
    h, w = x.shape[-2:]
    points = [((r + 0.5) * 96 / h, (c + 0.5) * 32 / w) for r in range(h) for c in range(w)]
    maps = [
        attention_maps(tiny_checkpoint, image, stage=1, group=g, points=points)
        for g in range(module.groups)
    ]
    with torch.no_grad():
        v = module.value(x).unflatten(1, (module.groups, -1)).flatten(3)  # (1, G, e, n)
        mats = torch.stack(
            [torch.from_numpy(m.maps["CSALR A_nm A_mm^-1 B"]).float().flatten(1) for m in maps]
        )  # (G, n, n)
        y = torch.einsum("gij,gej->gei", mats, v[0]).reshape(1, -1, h, w)
        torch.testing.assert_close(module.fuse(y), module(x)[1], rtol=1e-4, atol=1e-5)


def test_sa_shows_its_own_map(sa_checkpoint, image):
    maps = attention_maps(sa_checkpoint, image)
    assert maps.kind == "SelfAttention" and list(maps.maps) == ["SelfAttention map"]
    assert maps.errors is None and len(maps.points) == 4  # the default points
    assert maps.maps["SelfAttention map"].sum(axis=(1, 2)) == pytest.approx([1.0] * 4)


def test_figure_is_a_png_with_a_panel_per_point_and_map(tiny_checkpoint, image, tmp_path):
    maps = attention_maps(tiny_checkpoint, image)
    out = save_attention_figure(
        maps.image, maps.points, maps.maps, tmp_path / "fig.png", errors=maps.errors
    )
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert width > 2 * height  # 1 + 4 points x 2 maps: nine tall panels side by side
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage": 4}, r"stages \[1, 2, 3\], not 4"),
        ({"group": 5}, "groups; give --group 0-1"),
        ({"points": [(500.0, 3.0)]}, "outside the 96x32 input"),
        # the fix names the limits and the form that fits any input size
        ({"points": [(96.0, 3.0)]}, "give y below 96 and x below 32 .*, e.g. 50%,50%$"),
        ({"points": [QueryPoint(100, 50, "%")]}, "point 100%,50% lies outside"),
    ],
)
def test_bad_options_are_one_line(tiny_checkpoint, image, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        attention_maps(tiny_checkpoint, image, **kwargs)


def test_percent_points_land_on_the_same_cell_as_their_pixels(tiny_checkpoint, image):
    # 96x32 input: 25% of the height is pixel row 24, 75% of the width pixel column 24
    by_percent = attention_maps(tiny_checkpoint, image, points=[QueryPoint(25, 75, "%")])
    by_pixels = attention_maps(tiny_checkpoint, image, points=[(24.0, 24.0)])
    assert by_percent.points == by_pixels.points == ((6, 6),)  # on stage 1's 24x8 map
    np.testing.assert_array_equal(
        by_percent.maps["full softmax(QK^T)"], by_pixels.maps["full softmax(QK^T)"]
    )


@pytest.mark.parametrize(
    ("text", "point"),
    [("60,32", QueryPoint(60, 32)), (" 30% , 50%", QueryPoint(30, 50, "%"))],
)
def test_query_points_parse_pixels_and_percent(text, point):
    assert QueryPoint.parse(text) == point


@pytest.mark.parametrize("text", ["60", "60,32,1", "30%,50", "a,b", "30%%,5%"])
def test_malformed_query_points_are_refused_with_both_forms(text):
    with pytest.raises(ValueError, match=r"y,x in pixels .* \(e.g. 30%,50%\)"):
        QueryPoint.parse(text)


def test_a_missing_image_is_named(tiny_checkpoint, tmp_path):
    with pytest.raises(DatasetError, match="nope.jpg does not exist"):
        attention_maps(tiny_checkpoint, tmp_path / "nope.jpg")
