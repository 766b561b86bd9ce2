"""The paper's Figure 4: what an attention module attends to from chosen points of one image.

For a CSALR module, the full map ``softmax(Q K^T)`` its queries and keys give beside the
CSALR reconstruction ``A_nm A_mm^{-1} B`` the module applies (eq. 14), with the per-point
reconstruction error; an SA or CSA module shows the map it applies. Maps come from the
literal forms of :mod:`reidkit.models.reference`, so they are the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from reidkit.data.loading import IMAGENET_MEAN, IMAGENET_STD, build_transform
from reidkit.engine.checkpoint import load_model
from reidkit.errors import ConfigError, DatasetError
from reidkit.models import reference
from reidkit.models.attention import CSALR, GroupedAttention


@dataclass(frozen=True)
class QueryPoint:
    """A query point (y, x): pixels of the resized input, or percent of its height and width
    (which reads the same on every input size)."""

    y: float
    x: float
    unit: Literal["px", "%"] = "px"

    @classmethod
    def parse(cls, text: str) -> QueryPoint:
        """'y,x' in pixels or 'y%,x%' in percent; ValueError (its message the fix) otherwise."""
        parts = [part.strip() for part in text.split(",")]
        percent = [part.endswith("%") for part in parts]
        try:
            if len(parts) != 2 or percent[0] != percent[1]:
                raise ValueError
            y, x = (float(part.removesuffix("%")) for part in parts)
        except ValueError:
            raise ValueError(
                f"{text!r}: give a point as y,x in pixels of the resized input (e.g. 60,32) or "
                "in percent of its height and width (e.g. 30%,50%)"
            ) from None
        return cls(y, x, "%" if percent[0] else "px")

    def pixels(self, height: int, width: int) -> tuple[float, float]:
        """(y, x) in pixels of a `height` x `width` input."""
        if self.unit == "%":
            return self.y * height / 100, self.x * width / 100
        return self.y, self.x

    def __str__(self) -> str:
        unit = "%" if self.unit == "%" else ""
        return f"{self.y:g}{unit},{self.x:g}{unit}"


# Points chosen when none are given: down the middle of a pedestrian crop, at head, chest,
# hips and knees height.
DEFAULT_POINTS = tuple(QueryPoint(y, 50, "%") for y in (15, 35, 55, 80))


@dataclass(frozen=True)
class AttentionMaps:
    """Maps of one module and group for one image, at the module's map size (h, w)."""

    image: np.ndarray  # (H, W, 3) uint8: the image as the model saw it
    stage: int
    group: int
    kind: str  # the module's class: SelfAttention, CSA or CSALR
    points: tuple[tuple[int, int], ...]  # (row, column) on the h x w map
    maps: dict[str, np.ndarray]  # label -> (points, h, w), each row summing to 1
    errors: tuple[float, ...] | None  # CSALR: per point, total variation to the full map


def _map_point(
    point: QueryPoint | tuple[float, float], size: tuple[int, int], image: tuple[int, int]
):
    """A query point (a plain (y, x) is pixels) -> the (row, column) of the map cell holding it."""
    (h, w), (height, width) = size, image
    point = point if isinstance(point, QueryPoint) else QueryPoint(*point)
    y, x = point.pixels(height, width)
    if not (0 <= y < height and 0 <= x < width):
        raise ConfigError(
            f"point {point} lies outside the {height}x{width} input image; give y below "
            f"{height} and x below {width} (pixels of the resized input), or percentages of "
            "its height and width, e.g. 50%,50%"
        )
    return int(y * h / height), int(x * w / width)


@torch.no_grad()
def attention_maps(
    checkpoint: Path,
    image_path: Path,
    *,
    stage: int | None = None,
    group: int = 0,
    points: Sequence[QueryPoint | tuple[float, float]] | None = None,
) -> AttentionMaps:
    """Compute the maps of `checkpoint`'s module after `stage` (default: the first) for one
    image, from `points` (QueryPoints, or (y, x) in pixels of the resized input), or
    DEFAULT_POINTS."""
    net, state = load_model(checkpoint)
    config = state.config
    if not net.attention_stages:
        raise ConfigError(f"{checkpoint} has no attention modules (attention.kind = none)")
    if stage is None:  # not `stage or ...`: --stage 0 is a stage to refuse, not "the first"
        stage = net.attention_stages[0]
    if stage not in net.attention_stages:
        raise ConfigError(
            f"{checkpoint} has attention after stages {list(net.attention_stages)}, not {stage}"
        )
    module: GroupedAttention = net.attention[str(stage)]
    if not 0 <= group < module.groups:
        raise ConfigError(
            f"the module has {module.groups} groups; give --group 0-{module.groups - 1}"
        )
    try:
        with Image.open(image_path) as image:
            pil = image.convert("RGB")
    except Exception as err:  # PIL reports bad data with many types, DecompressionBombError too
        what = "does not exist" if not Path(image_path).exists() else f"is not an image ({err})"
        raise DatasetError(f"{image_path} {what}") from None
    data = config.data
    tensor = build_transform(data.height, data.width, train=False)(pil)[None]  # (1, 3, H, W)

    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    try:
        net(tensor)
    finally:
        handle.remove()
    x = captured[0].float()  # (1, C, h, w): the module's input
    h, w = x.shape[-2:]
    size = (data.height, data.width)
    cells = tuple(_map_point(p, (h, w), size) for p in points or DEFAULT_POINTS)
    rows = [r * w + c for r, c in cells]

    def pick(full: torch.Tensor) -> np.ndarray:  # (1, G, n, n) -> (points, h, w)
        return full[0, group, rows].view(len(rows), h, w).double().numpy()

    maps = {f"{type(module).__name__} map": pick(module.attention_map(x))}
    errors = None
    if isinstance(module, CSALR):
        q, k = module.queries_keys(x)
        full = pick(reference.full_attention_map(q, k))
        reconstructed = maps.pop("CSALR map")
        maps = {"full softmax(QK^T)": full, "CSALR A_nm A_mm^-1 B": reconstructed}
        errors = tuple(
            float(0.5 * np.abs(a - b).sum()) for a, b in zip(reconstructed, full, strict=True)
        )
    shown = tensor[0].numpy().transpose(1, 2, 0) * IMAGENET_STD + np.array(IMAGENET_MEAN)
    return AttentionMaps(
        image=np.clip(shown * 255 + 0.5, 0, 255).astype(np.uint8),
        stage=stage,
        group=group,
        kind=type(module).__name__,
        points=cells,
        maps=maps,
        errors=errors,
    )
