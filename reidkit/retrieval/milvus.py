"""Galleries in Milvus: Milvus Lite (a local folder, the engine inside this process) or a server.

`milvus:PATH.db` opens Milvus Lite, `milvus:http://HOST:19530` a Milvus server or cluster; the
same code talks to both through pymilvus. One collection is one gallery: a row per image with
its unit-length feature and metadata (path, pid, camid, frame, timestamp; -1 where unknown),
and, in the collection's properties, what made it (checkpoint and its SHA-256, feature kind,
flip, index), so a query embedded by another model is refused instead of ranked wrongly.

Index and metric: inner product (IP) on L2-normalised features is the cosine similarity,
the score the FAISS folders give, and what `evaluate` ranks by; Milvus's COSINE metric would
normalise every vector again for the same numbers. `--index flat` (the default) is Milvus's
FLAT, exact, so a gallery in Milvus ranks exactly as the in-memory path does; `ivf` is
IVF_FLAT (sqrt(rows per segment) lists, 16 probed) and `hnsw` HNSW (M=32), approximate, for
galleries where exact search is too slow. Milvus Lite 3 builds these with FAISS; it has no
IVF_PQ (a server does): `bench/gallery_scale.py` measures what they cost.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reidkit import __version__
from reidkit.errors import ReidkitError
from reidkit.retrieval.filters import INT_FIELDS, META_FIELDS, UNKNOWN, GalleryFilter
from reidkit.retrieval.gallery import model_words, same_model

PREFIX = "milvus:"
DEFAULT_COLLECTION = "reidkit_gallery"
INFO_PROPERTY = "reidkit.info"  # the collection property holding what made the gallery
GALLERY_FORMAT = "reidkit-gallery"
INDEX_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
METRIC = "IP"
PATH_LENGTH = 4096  # VARCHAR bytes for a path (Linux's PATH_MAX)
# One insert or search request stays under this many bytes of vectors: Milvus refuses gRPC
# messages over 64 MB, and a PCB `g` feature is 48 KB (12,288 floats).
REQUEST_BYTES = 16 * 2**20
# Rows per sealed segment in Milvus Lite (its MAX_SEGMENT_ROWS); a server's are larger.
SEGMENT_ROWS = 100_000
# A server returns at most this many matches per query (Milvus's topk limit); Lite has none.
SERVER_TOP_K = 16384
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")  # Milvus's rule for collection names
_TEMPORARY = "_reidkit_tmp_"


class MilvusError(ReidkitError):
    """A Milvus gallery cannot be reached, written or read; the message says how to fix it."""


def is_milvus(target: object) -> bool:
    """True for a `milvus:...` gallery address (as opposed to a FAISS index folder)."""
    return isinstance(target, str) and target.startswith(PREFIX)


@dataclass(frozen=True)
class MilvusTarget:
    """Where a gallery lives: pymilvus's URI (a local .db path or a server) and a collection."""

    uri: str
    collection: str = DEFAULT_COLLECTION

    @property
    def is_lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://", "tcp://", "grpc://"))

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.uri} (collection {self.collection})"


def parse_target(text: str, collection: str | None = None) -> MilvusTarget:
    """`milvus:PATH.db` (Milvus Lite) or `milvus:http://HOST:PORT` (a server) -> MilvusTarget."""
    rest = str(text)[len(PREFIX) :] if is_milvus(text) else str(text)
    name = collection or DEFAULT_COLLECTION
    if not _NAME.match(name) or _TEMPORARY in name:
        raise MilvusError(
            f"--collection {name!r}: a Milvus collection name is letters, digits and "
            "underscores, starts with a letter or underscore, is at most 255 long, and does "
            f"not contain {_TEMPORARY!r} (reidkit's temporary collections)"
        )
    if rest.startswith(("http://", "https://", "tcp://", "grpc://")):
        return MilvusTarget(rest, name)
    if rest.endswith(".db"):
        return MilvusTarget(str(Path(rest).expanduser().absolute()), name)
    raise MilvusError(
        f"{text!r} is not a Milvus address: give milvus:PATH.db for Milvus Lite (a local "
        "database) or milvus:http://HOST:19530 for a Milvus server"
    )


def import_pymilvus() -> Any:
    """The pymilvus module, quiet (errors reach the user as one line, not as its log)."""
    try:
        import pymilvus
    except ImportError as err:
        raise MilvusError(
            "Milvus galleries need pymilvus and Milvus Lite: pip install 'reidkit[milvus]'"
        ) from err
    # pymilvus and Milvus Lite log every failed call with a traceback at ERROR level; the
    # failure still raises, and reidkit turns it into one line.
    for name in ("pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def _reason(err: BaseException) -> str:
    text = str(getattr(err, "message", "") or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_lite_path(target: MilvusTarget) -> None:
    path = Path(target.uri)
    if path.exists() and not path.is_dir():
        raise MilvusError(
            f"{path} is a file; Milvus Lite keeps a database in a folder of that name: give "
            "milvus:NEW.db"
        )
    if path.is_dir() and any(path.iterdir()) and not (path / "collections").is_dir():
        raise MilvusError(
            f"{path} is a folder that is not a Milvus Lite database; reidkit writes nothing into "
            "other folders: give milvus:NEW.db"
        )


def connect(target: MilvusTarget, *, create: bool = False) -> Any:
    """A MilvusClient for `target`, or one line saying why it cannot be reached.

    A Milvus Lite database is opened only where it exists, unless `create`.
    """
    pymilvus = import_pymilvus()
    if target.is_lite:
        _check_lite_path(target)
        if not create and not Path(target.uri).is_dir():
            raise MilvusError(
                f"no Milvus Lite database at {target.uri}; build one with `reidkit extract "
                f"CHECKPOINT --out {PREFIX}{target.uri}`"
            )
        if create:
            Path(target.uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return pymilvus.MilvusClient(uri=target.uri, timeout=10)
    except Exception as err:
        if target.is_lite:
            raise MilvusError(
                f"cannot open the Milvus Lite database {target.uri} ({_reason(err)}); Milvus "
                "Lite lets one process open a database at a time: close the other one, or "
                "give another milvus:PATH.db"
            ) from None
        raise MilvusError(
            f"cannot reach the Milvus server at {target.uri} ({_reason(err)}); start it or "
            f"check the address, or use {PREFIX}PATH.db for a local Milvus Lite database"
        ) from None


def read_info(client: Any, collection: str) -> dict[str, Any] | None:
    """What made a collection reidkit wrote; None for a collection reidkit did not write."""
    properties = client.describe_collection(collection).get("properties") or {}
    try:
        info = json.loads(properties.get(INFO_PROPERTY, ""))
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("format") != GALLERY_FORMAT:
        return None
    return info


def check_destination(target: MilvusTarget, model: dict[str, Any]) -> None:
    """Refuse, before any image is embedded, a collection `write_gallery` must not replace.

    Reachable, and the collection new or a gallery reidkit wrote with the same checkpoint,
    feature kind and flip (which is replaced). Nothing is created or dropped here.
    """
    if target.is_lite and not Path(target.uri).is_dir():
        _check_lite_path(target)
        return
    client = connect(target)
    try:
        if not client.has_collection(target.collection):
            return
        info = read_info(client, target.collection)
        if info is None:
            raise MilvusError(
                f"collection {target.collection} in {PREFIX}{target.uri} was not written by "
                "reidkit; reidkit replaces only its own galleries: give another --collection"
            )
        if not same_model(info, model):
            raise MilvusError(
                f"collection {target.collection} in {PREFIX}{target.uri} holds the gallery of "
                f"{model_words(info)}, not {model_words(model)}; give another --collection "
                "(reidkit does not drop a gallery of another model)"
            )
    finally:
        client.close()


def _rows_per_request(dim: int) -> int:
    return max(1, REQUEST_BYTES // (4 * max(dim, 1)))


def index_params(kind: str, num_rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(build parameters, search parameters) of the Milvus index for `--index kind`.

    Milvus builds one index per segment, so IVF's lists follow the segment, not the gallery:
    sqrt(rows per segment) lists (Milvus Lite seals segments of at most SEGMENT_ROWS), 16 of
    them probed, the FAISS folders' setting.
    """
    if kind == "ivf":
        nlist = max(1, round(math.sqrt(max(1, min(num_rows, SEGMENT_ROWS)))))
        return {"nlist": nlist}, {"nprobe": min(16, nlist)}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80}, {"ef": 128}
    return {}, {}


class GalleryWriter:
    """Fills a new collection, then puts it in the place of `target.collection`.

    Rows go into a temporary collection; `commit` drops the previous gallery (only one
    reidkit wrote, checked by `check_destination`) and renames the new one into its place,
    so an interrupted extraction leaves the previous gallery as it was and no partial one
    under the name. `abort` (and leaving the `with` block by an exception) drops the
    temporary collection.
    """

    def __init__(
        self,
        target: MilvusTarget,
        *,
        dim: int,
        num_rows: int,
        index_kind: str,
        info: dict[str, Any],
    ) -> None:
        if index_kind not in INDEX_TYPES:
            kinds = ", ".join(INDEX_TYPES)
            raise ValueError(f"unknown index kind {index_kind!r}; choose one of {kinds}")
        pymilvus = import_pymilvus()
        self.target, self.dim, self.num_rows, self.index_kind = target, dim, num_rows, index_kind
        self.client = connect(target, create=True)
        self.temporary = f"{target.collection}{_TEMPORARY}{secrets.token_hex(4)}"
        self.written = 0
        self._known: set[str] = set()
        build, search = index_params(index_kind, num_rows)
        self.info = {
            **info,
            "format": GALLERY_FORMAT,
            "dim": int(dim),
            "index_kind": index_kind,
            "milvus_index": INDEX_TYPES[index_kind],
            "metric": METRIC,
            "normalized": True,
            "search_params": search,
            "reidkit_version": __version__,
        }
        DataType = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)  # the merged extraction order
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("path", DataType.VARCHAR, max_length=PATH_LENGTH)
        for name in INT_FIELDS:
            schema.add_field(name, DataType.INT64)
        params = self.client.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_type=INDEX_TYPES[index_kind],
            metric_type=METRIC,
            params=build,
        )
        try:
            self.client.create_collection(self.temporary, schema=schema, index_params=params)
        except Exception as err:
            self.client.close()
            raise MilvusError(
                f"cannot create a collection in {target.label}: {_reason(err)}"
            ) from None

    def add(self, features: np.ndarray, meta: pd.DataFrame) -> None:
        """Append rows (unit-length float32 features, META_FIELDS columns) in order."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.dim or len(features) != len(meta):
            raise ValueError(f"features {features.shape} and {len(meta)} meta rows do not fit")
        columns = {name: _column(meta, name) for name in META_FIELDS}
        too_long = [p for p in columns["path"] if len(p.encode()) > PATH_LENGTH]
        if too_long:
            raise MilvusError(
                f"path {too_long[0][:80]}… is longer than {PATH_LENGTH} bytes, more than a "
                "Milvus gallery stores; shorten the folder names"
            )
        for name in INT_FIELDS:
            if (columns[name] != UNKNOWN).any():
                self._known.add(name)
        if any(columns["path"]):
            self._known.add("path")
        step = _rows_per_request(self.dim)
        first = self.written  # row numbers continue those of earlier calls
        for start in range(0, len(features), step):
            stop = min(start + step, len(features))
            rows = [
                {
                    "row": first + i,
                    "vector": features[i],
                    "path": columns["path"][i],
                    **{name: int(columns[name][i]) for name in INT_FIELDS},
                }
                for i in range(start, stop)
            ]
            self._call("insert", self.temporary, rows)
            self.written += stop - start

    def commit(self) -> MilvusTarget:
        """Flush, record what made the gallery, and rename it into place."""
        info = {
            **self.info,
            "num_rows": int(self.written),
            "fields": [name for name in META_FIELDS if name in self._known],
        }
        client, name = self.client, self.target.collection
        self._call("flush", self.temporary)
        self._call(
            "alter_collection_properties",
            self.temporary,
            properties={INFO_PROPERTY: json.dumps(info, sort_keys=True, default=str)},
        )
        if client.has_collection(name):
            # check_destination allowed it: a gallery of the same model, which this replaces
            self._call("drop_collection", name)
        self._call("rename_collection", self.temporary, name)
        self._call("load_collection", name)
        client.close()
        return self.target

    def abort(self) -> None:
        try:
            if self.client.has_collection(self.temporary):
                self.client.drop_collection(self.temporary)
        finally:
            self.client.close()

    def __enter__(self) -> GalleryWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as err:
            raise MilvusError(f"writing {self.target.label} failed: {_reason(err)}") from None


def _hit_columns(found: Any) -> tuple[list[int], list[float]]:
    """(primary keys, scores) of one query's hits; pymilvus 3 gives them as columns."""
    if hasattr(found, "ids") and hasattr(found, "distances"):
        return list(found.ids), list(found.distances)
    return [hit["id"] for hit in found], [hit["distance"] for hit in found]


def _column(meta: pd.DataFrame, name: str) -> np.ndarray:
    if name == "path":
        values = meta["path"] if "path" in meta.columns else pd.Series([""] * len(meta))
        return np.asarray(values.astype(str).tolist(), dtype=object)
    if name not in meta.columns:
        return np.full(len(meta), UNKNOWN, dtype=np.int64)
    return meta[name].to_numpy(np.int64)


class MilvusGallery:
    """A gallery collection, searched with the signature of every reidkit index.

    `search(queries, k, where=...)` -> (scores (Nq, k) float32 descending, rows (Nq, k)
    int64; -1 and -inf where fewer than k rows pass the filter); `rows_meta(rows)` reads
    those rows' metadata.
    """

    kind = "milvus"
    normalize = True

    def __init__(self, target: MilvusTarget, client: Any, info: dict[str, Any]) -> None:
        self.target, self.client, self.info = target, client, info

    @classmethod
    def open(cls, target: MilvusTarget) -> MilvusGallery:
        client = connect(target)
        try:
            if not client.has_collection(target.collection):
                others = [c for c in client.list_collections() if _TEMPORARY not in c]
                listed = f" (it holds {', '.join(others)})" if others else ""
                raise MilvusError(
                    f"no collection {target.collection} in {PREFIX}{target.uri}{listed}; give "
                    "--collection, or build it with `reidkit extract CHECKPOINT --out "
                    f"{PREFIX}{target.uri} --collection {target.collection}`"
                )
            info = read_info(client, target.collection)
            if info is None:
                raise MilvusError(
                    f"collection {target.collection} in {PREFIX}{target.uri} was not written by "
                    "reidkit `extract`; reidkit searches only galleries it wrote"
                )
            client.load_collection(target.collection)
        except MilvusError:
            client.close()
            raise
        except Exception as err:
            client.close()
            raise MilvusError(f"cannot read {target.label}: {_reason(err)}") from None
        return cls(target, client, info)

    @property
    def name(self) -> str:
        return self.target.label

    @property
    def ntotal(self) -> int:
        return int(self.info["num_rows"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.info.get("fields", ()))

    def close(self) -> None:
        self.client.close()

    def search(
        self, queries: np.ndarray, k: int, *, where: GalleryFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product (cosine) among those `where` keeps, in Milvus."""
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries have shape {queries.shape}, the gallery holds {self.dim}-d")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self.ntotal)
        if not self.target.is_lite and k > SERVER_TOP_K:
            raise MilvusError(
                f"{k:,} matches per query asked of {self.name}, and a Milvus server returns at "
                f"most {SERVER_TOP_K:,}; ask for fewer (or evaluate a FAISS folder gallery)"
            )
        expression = ""
        if where is not None and not where.is_empty:
            where.check_fields(self.fields, self.name)
            expression = where.expression()
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.maximum(norms, np.float32(1e-12))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        # Bounded requests: query vectors, and k results for each, per call.
        step = max(1, min(_rows_per_request(self.dim), 2**20 // max(k, 1)))
        params = {"metric_type": METRIC, "params": dict(self.info.get("search_params", {}))}
        for start in range(0, len(queries), step):
            chunk = queries[start : start + step]
            try:
                hits = self.client.search(
                    self.target.collection,
                    data=list(chunk),
                    limit=k,
                    filter=expression,
                    search_params=params,
                    output_fields=[],
                )
            except Exception as err:
                raise MilvusError(f"searching {self.name} failed: {_reason(err)}") from None
            for offset, found in enumerate(hits):
                ids, distances = _hit_columns(found)
                rows[start + offset, : len(ids)] = ids
                scores[start + offset, : len(ids)] = distances
        return scores, rows

    def rows_meta(self, rows: np.ndarray) -> pd.DataFrame:
        """The metadata (META_FIELDS) of `rows`, in their order."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        found: dict[int, dict[str, Any]] = {}
        unique = np.unique(rows).tolist()
        for start in range(0, len(unique), 1000):
            ids = unique[start : start + 1000]
            try:
                records = self.client.query(
                    self.target.collection,
                    filter=f"row in [{', '.join(str(i) for i in ids)}]",
                    output_fields=["row", *META_FIELDS],
                )
            except Exception as err:
                raise MilvusError(f"reading {self.name} failed: {_reason(err)}") from None
            found.update({int(record["row"]): record for record in records})
        missing = [r for r in rows.tolist() if r not in found]
        if missing:
            raise MilvusError(f"{self.name} lacks row {missing[0]}; extract the gallery again")
        return pd.DataFrame(
            {name: [found[r][name] for r in rows.tolist()] for name in META_FIELDS}
        ).astype({name: np.int64 for name in INT_FIELDS})

    def iter_rows(self, batch_size: int = 10_000) -> Iterator[pd.DataFrame]:
        """Every row's metadata, in batches (row order within a batch)."""
        for start in range(0, self.ntotal, batch_size):
            yield self.rows_meta(np.arange(start, min(start + batch_size, self.ntotal)))
