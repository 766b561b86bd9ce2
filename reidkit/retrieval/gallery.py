"""A gallery to search, wherever it lives: a FAISS index folder or a Milvus collection.

Both answer `search(queries, k, where=GalleryFilter(...))` with (scores, rows) and
`rows_meta(rows)` with the rows' path, pid, camid, frame and timestamp, and both record what
made their features (`info`), so `search`, `evaluate` and the Python API treat them alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from reidkit.errors import ReidkitError
from reidkit.retrieval.filters import GalleryFilter

# What must agree between a gallery and the model that embeds its queries.
MODEL_KEYS: tuple[str, ...] = ("checkpoint_sha256", "feature_kind", "flip")


class GalleryModelError(ReidkitError):
    """A gallery made by another checkpoint, feature kind or flip setting than the queries."""


class Gallery(Protocol):
    """What `open_gallery` returns."""

    info: dict[str, Any]  # what made it: checkpoint, checkpoint_sha256, feature_kind, flip, ...

    @property
    def name(self) -> str: ...

    @property
    def ntotal(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def fields(self) -> tuple[str, ...]: ...

    def search(
        self, queries: np.ndarray, k: int, *, where: GalleryFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def rows_meta(self, rows: np.ndarray) -> pd.DataFrame: ...


def same_model(info: dict[str, Any], model: dict[str, Any]) -> bool:
    """True when `info` and `model` name the same weights (SHA-256), feature kind and flip."""
    return all(info.get(key) == model.get(key) for key in MODEL_KEYS)


def model_words(info: dict[str, Any]) -> str:
    """The model of a gallery (or of a query), in a few words."""
    digest = str(info.get("checkpoint_sha256") or "?")[:12]
    flip = "flip on" if info.get("flip") else "flip off"
    feature = info.get("feature_kind")
    return f"{info.get('checkpoint')} (sha256 {digest}…), feature {feature}, {flip}"


def check_model(info: dict[str, Any], model: dict[str, Any], gallery: str) -> None:
    """Refuse a gallery whose features another checkpoint, feature kind or flip setting made:
    its scores against these queries would mean nothing."""
    if same_model(info, model):
        return
    raise GalleryModelError(
        f"gallery {gallery} holds features of {model_words(info)}, not of {model_words(model)}; "
        "use the gallery's own checkpoint and settings, or extract the gallery again"
    )


def open_gallery(target: str | Path, collection: str | None = None) -> Gallery:
    """`milvus:PATH.db` / `milvus:http://HOST:PORT` (with `collection`), else an index folder."""
    from reidkit.retrieval.index import load_index_folder
    from reidkit.retrieval.milvus import MilvusGallery, is_milvus, parse_target

    if is_milvus(target):
        return MilvusGallery.open(parse_target(str(target), collection))
    return load_index_folder(Path(target))
