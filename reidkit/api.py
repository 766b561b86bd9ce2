"""The Python API: a trained model that embeds images, and a gallery index to search.

    from reidkit import load_model, GalleryIndex
    model = load_model("runs/demo/run/last.pt")
    features = model.embed(["a.jpg", "b.jpg"])        # (2, D) float32, unit rows
    index = GalleryIndex.build(features, paths=["a.jpg", "b.jpg"])
    scores, rows = index.search(model.embed(["query.jpg"]), k=1)

    from reidkit import GalleryFilter, open_gallery
    gallery = open_gallery("milvus:gallery.db")          # or an index folder
    scores, rows = gallery.search(queries, k=10, where=GalleryFilter(cameras=(3, 4, 5)))
    matches = gallery.rows_meta(rows[0][rows[0] >= 0])   # path, pid, camid, frame, timestamp

`reidkit extract` and `reidkit search` run on the same pieces: the checkpoint's transforms,
`reidkit.engine.extract.embed_images` and `reidkit.retrieval` (index, milvus, gallery).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from reidkit import __version__
from reidkit.config import RunConfig
from reidkit.data.datasets import parse_market_name
from reidkit.data.loading import build_transform
from reidkit.engine.checkpoint import checkpoint_digest
from reidkit.engine.checkpoint import load_model as load_checkpoint_model
from reidkit.engine.extract import check_finite, embed_images
from reidkit.errors import DatasetError, NumericalError
from reidkit.models.net import ReidNet
from reidkit.retrieval.filters import GalleryFilter
from reidkit.retrieval.gallery import Gallery, open_gallery
from reidkit.retrieval.index import (
    SearchIndex,
    build_index,
    known_fields,
    load_index_folder,
    save_index_folder,
)

ImageLike = Image.Image | np.ndarray | str | Path
__all__ = [
    "Gallery",
    "GalleryFilter",
    "GalleryIndex",
    "ReidModel",
    "load_model",
    "open_gallery",
]


class ReidModel:
    """A trained network with its test transform and feature: images in, features out.

    Made by :func:`load_model`. ``embed`` takes PIL images, ``(H, W, 3)`` uint8 RGB arrays or
    paths, resizes and normalises them as the checkpoint's evaluation did, and returns unit
    length float32 features (inner product = cosine similarity), in order.
    """

    def __init__(self, net: ReidNet, config: RunConfig, checkpoint: Path, device: torch.device):
        self.net, self.config, self.checkpoint, self.device = net, config, checkpoint, device
        data = config.data
        self._transform = build_transform(data.height, data.width, train=False)
        # the flip settings `embed` has used, so that a gallery records how it was embedded
        self.embedded_flips: set[bool] = set()

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) every image is resized to."""
        return self.config.data.height, self.config.data.width

    @property
    def feature(self) -> str:
        """The feature kind from the checkpoint's `eval.feature` (g: pooled parts)."""
        return self.config.eval.feature

    def embed(
        self,
        images: Iterable[ImageLike],
        *,
        batch_size: int | None = None,
        flip: bool | None = None,
    ) -> np.ndarray:
        """(N, D) float32 features of `images`, each row of unit length.

        `images` is a sequence of images (PIL images, (H, W, 3) uint8 arrays, paths), or one
        image, which gives one row. `flip` averages each image with its mirror image
        (default: the checkpoint's `eval.flip`); `batch_size` defaults to its
        `eval.batch_size`.
        """
        flip = self.config.eval.flip if flip is None else bool(flip)
        batch_size = batch_size or self.config.eval.batch_size
        if _is_one_image(images):  # a path string would otherwise be embedded letter by letter
            images = [images]
        elif not isinstance(images, Iterable):
            raise DatasetError(
                f"embed() takes images (PIL images, (H, W, 3) uint8 arrays or paths), one or a "
                f"list of them; got a {type(images).__name__}"
            )
        self.embedded_flips.add(flip)
        chunks, batch = [], []
        for item in images:
            batch.append(self._transform(_as_image(item)))
            if len(batch) == batch_size:
                chunks.append(self._embed_batch(batch, flip))
                batch = []
        if batch:
            chunks.append(self._embed_batch(batch, flip))
        if not chunks:
            raise DatasetError("embed() was given no images")
        return np.concatenate(chunks)

    @torch.inference_mode()
    def _embed_batch(self, batch: list[torch.Tensor], flip: bool) -> np.ndarray:
        images = torch.stack(batch).to(self.device)  # (B, 3, H, W)
        try:
            features = embed_images(self.net, images, feature=self.feature, flip=flip)
        except torch.linalg.LinAlgError as err:
            raise NumericalError(
                f"a CSALR landmark matrix became singular while embedding ({err}); retrain "
                "with --set attention.landmark_weight=2"
            ) from None
        check_finite(features)
        return features.cpu().numpy().astype(np.float32, copy=False)


def _is_one_image(item: object) -> bool:
    """A single image, not a sequence of them: a path, a PIL image, an (H, W, 3) array."""
    if isinstance(item, np.ndarray):
        return item.ndim == 3
    return isinstance(item, str | Path | Image.Image)


def _as_image(item: ImageLike) -> Image.Image:
    """A PIL image from an image, an (H, W, 3) uint8 array or a path; one line if it is none."""
    if isinstance(item, Image.Image):
        return _with_pixels(item, "a PIL image")
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise DatasetError(
                f"an image array must be (H, W, 3) uint8 RGB, got {item.dtype} {item.shape}"
            )
        return _with_pixels(Image.fromarray(item), "an image array")
    if isinstance(item, str | Path):
        path = Path(item).expanduser()
        try:
            with Image.open(path) as image:
                image.load()
                return _with_pixels(image.convert("RGB"), str(path))
        except DatasetError:
            raise
        except Exception as err:  # PIL's errors have many types, DecompressionBombError too
            what = "does not exist" if not path.exists() else f"is not a readable image ({err})"
            raise DatasetError(f"{path} {what}") from None
    raise DatasetError(f"cannot embed a {type(item).__name__}; give PIL images, arrays or paths")


def _with_pixels(image: Image.Image, what: str) -> Image.Image:
    """`image`, unless it has no pixels (resizing an empty image would invent a feature)."""
    width, height = image.size
    if width < 1 or height < 1:
        raise DatasetError(f"{what} has no pixels ({width}x{height}); give a non-empty image")
    return image


def load_model(checkpoint: str | Path, *, device: str | torch.device | None = None) -> ReidModel:
    """A checkpoint written by `reidkit train`, ready to embed (CUDA when present)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, state = load_checkpoint_model(Path(checkpoint))
    return ReidModel(net.to(device), state.config, Path(checkpoint).resolve(), device)


@dataclass
class GalleryIndex:
    """Gallery features with what each row is, searchable; saved as a `reidkit extract` folder."""

    index: SearchIndex
    features: np.ndarray  # (N, D) float32
    meta: pd.DataFrame  # path, pid, camid per row (-1 where unknown)
    info: dict[str, Any]

    @classmethod
    def build(
        cls,
        features: np.ndarray,
        *,
        paths: Sequence[str | Path] | None = None,
        pids: Sequence[int] | None = None,
        camids: Sequence[int] | None = None,
        kind: str = "flat",
        model: ReidModel | None = None,
        flip: bool | None = None,
    ) -> GalleryIndex:
        """An index over `features` (flat: exact; ivf, hnsw: approximate; exact: no FAISS).

        Without `pids` / `camids`, they are read from file names that start `PID_cCAM`, as
        `reidkit extract --images` reads them (-1 for any other name or without `paths`).
        `paths` are stored absolute, as `extract` stores them, so that the saved folder is
        searched from any working folder. `flip` is recorded so that `reidkit search` embeds
        queries as the gallery was; by default it is the one `model.embed` used (refused
        when it used both), else the model's `eval.flip`.
        """
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or not features.size:
            raise DatasetError(
                f"GalleryIndex.build needs (N, D) features with N and D at least 1, got shape "
                f"{features.shape}"
            )
        n = len(features)
        if paths is not None:
            names = [str(Path(p).expanduser().resolve()) for p in paths]
        else:
            names = [""] * n
        if model is not None and flip is None:
            if len(model.embedded_flips) > 1:
                raise DatasetError(
                    "the model has embedded images both with and without flip; pass "
                    "GalleryIndex.build(..., flip=True or False) to say how these were embedded"
                )
            flip = next(iter(model.embedded_flips), model.config.eval.flip)
        parsed = [parse_market_name(Path(name).name) or (-1, -1) for name in names]
        meta = pd.DataFrame(
            {
                "path": names,
                "pid": np.asarray(pids if pids is not None else [p for p, _ in parsed], np.int64),
                "camid": np.asarray(
                    camids if camids is not None else [c for _, c in parsed], np.int64
                ),
            }
        )
        if len(meta) != n:
            raise ValueError(f"{len(meta)} paths / pids / camids for {n} feature rows")
        info = {
            "checkpoint": str(model.checkpoint) if model else "",
            "checkpoint_sha256": checkpoint_digest(model.checkpoint) if model else "",
            "feature_kind": model.feature if model else "",
            "flip": bool(flip),
            "source": "python api",
            "reidkit": __version__,
        }
        return cls(build_index(features, kind), features, meta, info)

    @classmethod
    def load(cls, folder: str | Path) -> GalleryIndex:
        """An index folder written by `reidkit extract` or :meth:`save`."""
        loaded = load_index_folder(Path(folder))
        return cls(loaded.index, np.asarray(loaded.features), loaded.meta, loaded.info)

    def save(self, folder: str | Path) -> Path:
        """Write the folder (index.faiss, features.npy, meta.csv, info.json) atomically."""
        return save_index_folder(Path(folder), self.index, self.features, self.meta, self.info)

    def search(
        self, queries: np.ndarray, k: int = 10, *, where: GalleryFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: (scores (Nq, k) cosine, descending; rows (Nq, k) into `meta`).

        `where` keeps only the rows it matches, e.g. `GalleryFilter(cameras=(3, 4, 5))`
        (-1 fills the slots no kept row reaches)."""
        queries = np.asarray(queries, dtype=np.float32)
        if where is None or where.is_empty:
            return self.index.search(queries, k)
        where.check_fields(known_fields(self.meta), "GalleryIndex")
        return self.index.search(queries, k, rows=np.flatnonzero(where.mask(self.meta)))
