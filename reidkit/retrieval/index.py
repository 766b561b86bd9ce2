"""Gallery search behind one signature: an exact torch index (the oracle) and FAISS indexes."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from reidkit import __version__
from reidkit.errors import DatasetError, IndexFolderError, NumericalError, ReidkitError
from reidkit.outputs import check_owned_folder, named_os_error, temporary_path
from reidkit.retrieval.filters import META_FIELDS, UNKNOWN, GalleryFilter

if TYPE_CHECKING:
    import faiss

KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw", "exact")
META_COLUMNS: tuple[str, ...] = ("path", "pid", "camid")
FOLDER_FILES: tuple[str, ...] = ("index.faiss", "meta.csv", "features.npy", "info.json")
# Written into every index folder: only a folder carrying it may be replaced by a new index,
# so `extract --out` never deletes a folder of someone's files (or its own --images).
INDEX_MARKER = ".reidkit-index"
# info.json keys the caller supplies; save_index_folder adds the rest (see INFO_KEYS).
CALLER_INFO_KEYS: tuple[str, ...] = ("checkpoint", "feature_kind")
INFO_KEYS: tuple[str, ...] = (
    *CALLER_INFO_KEYS,
    "dim",
    "num_rows",
    "index_kind",
    "normalized",
    "reidkit_version",
)


class FaissMissingError(ReidkitError, ImportError):
    """FAISS is not installed; the exact index works without it."""


def _pin_openblas_core() -> None:
    """Name the CPU's OpenBLAS kernel family before faiss loads its bundled OpenBLAS.

    faiss-cpu wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15.1), which does not
    recognise recent CPUs (Sapphire Rapids here) and falls back to its generic Prescott SSE3
    kernels: a batch IndexFlatIP search ran 6x slower (14.6 s against 2.3 s with SkylakeX for
    3,368 x 15,913 at 2,048-d). OpenBLAS reads OPENBLAS_CORETYPE once, when it loads, so it
    is set here only when unset, faiss not yet loaded, and only to a family whose
    instructions /proc/cpuinfo lists.
    """
    if "OPENBLAS_CORETYPE" in os.environ or "faiss" in sys.modules:
        return
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(
                (line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), []
            )
    except OSError:
        return
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


def import_faiss() -> Any:
    """The faiss module, or FaissMissingError saying how to install it."""
    _pin_openblas_core()
    try:
        import faiss
    except ImportError as err:
        raise FaissMissingError(
            "faiss is not installed: `pip install faiss-cpu` (or faiss-gpu on a CUDA machine);"
            " kind='exact' searches without it"
        ) from err
    return faiss


class SearchIndex(Protocol):
    """What every index offers: one search signature, higher score = more similar.

    `search(queries, k, rows=...)` returns (scores (Nq, k) float32 descending, indices (Nq, k)
    int64); `rows` restricts the search to those gallery rows (a metadata filter's result).
    Slots an index could not fill hold index -1 and score -inf.
    """

    kind: str
    normalize: bool

    @property
    def ntotal(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def search(
        self, queries: np.ndarray, k: int, *, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


def _as_rows(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """(N, D) float32 rows, at least one, every value finite: a NaN row would rank anywhere."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, the index holds {dim}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DatasetError(f"{name} hold no values (shape {x.shape}); give at least one row")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise NumericalError(
            f"{name} hold NaN or infinite values in {len(bad):,} of {len(x):,} rows (first: row "
            f"{bad[0]}); they come from a damaged model or data: embed them again with an "
            "intact checkpoint"
        )
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def _check_k(k: int, ntotal: int) -> int:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return min(k, ntotal)


def _checked_rows(rows: np.ndarray | None, ntotal: int) -> np.ndarray | None:
    """Allowed gallery rows, ascending and unique (so ties still go to the lower row)."""
    if rows is None:
        return None
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) and (rows[0] < 0 or rows[-1] >= ntotal):
        raise ValueError(f"rows must lie in 0..{ntotal - 1}, got {rows[0]}..{rows[-1]}")
    return rows


def _unfilled(num_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.full((num_queries, k), -np.inf, dtype=np.float32),
        np.full((num_queries, k), -1, dtype=np.int64),
    )


class ExactIndex:
    """Brute-force inner-product search with torch: the oracle the FAISS indexes answer to.

    Scores are inner products (cosine similarities when `normalize`, the default, scales
    gallery and query rows to unit length). Ties: equal scores come in ascending gallery
    index, exactly as a stable sort by descending score. `k` is capped at the gallery size.
    """

    kind = "exact"

    def __init__(
        self,
        features: np.ndarray,
        *,
        normalize: bool = True,
        chunk_size: int = 1024,
        device: str = "cpu",
    ) -> None:
        import torch

        features = _as_rows(features, "features")
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.features = l2_normalize(features) if normalize else features
        self._gallery = torch.from_numpy(self.features).to(device)

    @property
    def ntotal(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def search(
        self, queries: np.ndarray, k: int, *, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Nq, k) float32 descending, indices (Nq, k) int64), among `rows`
        when given (k capped at their number)."""
        import torch

        queries = _as_rows(queries, "queries", self.dim)
        if self.normalize:
            queries = l2_normalize(queries)
        k = _check_k(k, self.ntotal)
        rows = _checked_rows(rows, self.ntotal)
        gallery = self._gallery
        if rows is not None:
            k = min(k, len(rows))
            if k == 0:
                return _unfilled(len(queries), 0)
            gallery = gallery[torch.from_numpy(rows).to(gallery.device)]  # (R, D)
        scores = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.chunk_size):
            q = torch.from_numpy(queries[start : start + self.chunk_size]).to(gallery.device)
            sims = q @ gallery.T  # (C, N) or (C, R)
            top, idx = _stable_topk(sims, k)
            scores[start : start + len(q)] = top.cpu().numpy()
            found = idx.cpu().numpy()
            indices[start : start + len(q)] = found if rows is None else rows[found]
        return scores, indices


def _stable_topk(sims: Any, k: int) -> tuple[Any, Any]:
    """torch.topk with ties resolved to the lower index, including ties at the k-th place."""
    import torch

    top, idx = torch.topk(sims, k, dim=1)  # descending, ties in any order
    kth = top[:, -1:]
    # Rows where more entries equal the k-th score than were taken: pick the lowest indices.
    n_ge = (sims >= kth).sum(dim=1)
    for row in torch.nonzero(n_ge > k).flatten().tolist():
        cand = torch.nonzero(sims[row] >= kth[row]).flatten()  # ascending index
        order = torch.sort(sims[row, cand], descending=True, stable=True).indices[:k]
        idx[row] = cand[order]
        top[row] = sims[row, idx[row]]
    # Within the selection, order by (score desc, index asc): sort by index, then stably by score.
    by_index = torch.sort(idx, dim=1).indices
    idx = torch.gather(idx, 1, by_index)
    top = torch.gather(top, 1, by_index)
    by_score = torch.sort(top, dim=1, descending=True, stable=True).indices
    return torch.gather(top, 1, by_score), torch.gather(idx, 1, by_score)


@dataclass
class FaissIndex:
    """A FAISS index over (by default L2-normalised) features, searched by inner product.

    kind "flat" is exact (IndexFlatIP); "ivf" (IndexIVFFlat, `nprobe` lists probed) and
    "hnsw" (IndexHNSWFlat, `ef_search`) are approximate, for large galleries. Ties: FAISS
    may order equal scores differently from `ExactIndex`. Rows that an approximate index
    could not fill (fewer than k candidates in the probed lists) hold index -1, score -inf.
    """

    index: Any  # faiss.Index, on the GPU when one was used
    kind: str
    normalize: bool = True
    on_gpu: bool = False
    _gpu_resources: Any = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(
        self, queries: np.ndarray, k: int, *, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Nq, k) float32 descending, indices (Nq, k) int64), among `rows`
        when given: a FAISS ID selector, so the index itself skips the other rows."""
        queries = _as_rows(queries, "queries", self.dim)
        if self.normalize:
            queries = l2_normalize(queries)
        k = _check_k(k, self.ntotal)
        rows = _checked_rows(rows, self.ntotal)
        if rows is None:
            scores, indices = self.index.search(queries, k)
        else:
            k = min(k, len(rows))
            if k == 0:
                return _unfilled(len(queries), 0)
            scores, indices = self._search_rows(queries, k, rows)
        scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
        return scores, indices.astype(np.int64)

    def _search_rows(
        self, queries: np.ndarray, k: int, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        # A bitmap, one bit per gallery row: constant-time membership at any selectivity.
        allowed = np.zeros(self.ntotal, dtype=bool)
        allowed[rows] = True
        bits = np.packbits(allowed, bitorder="little")  # kept alive through the search
        selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bits))
        index = self.cpu_index()  # GPU indexes take no selector; filtered search runs on CPU
        if self.kind == "ivf":
            nprobe = int(faiss.extract_index_ivf(index).nprobe)
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        elif self.kind == "hnsw":
            ef = int(faiss.downcast_index(index).hnsw.efSearch)
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        else:
            params = faiss.SearchParameters(sel=selector)
        return index.search(queries, k, params=params)

    def cpu_index(self) -> faiss.Index:
        """The index on the CPU (a copy when it lives on a GPU), as faiss.write_index needs."""
        if not self.on_gpu:
            return self.index
        return import_faiss().index_gpu_to_cpu(self.index)

    def search_params(self) -> dict[str, int]:
        """The search-time settings that info.json records (faiss files may not keep them)."""
        faiss = import_faiss()
        cpu = self.cpu_index()
        if self.kind == "ivf":
            return {"nprobe": int(faiss.extract_index_ivf(cpu).nprobe)}
        if self.kind == "hnsw":
            return {"ef_search": int(faiss.downcast_index(cpu).hnsw.efSearch)}
        return {}


def _maybe_to_gpu(index: Any, kind: str, use_gpu: bool | None) -> tuple[Any, bool, Any]:
    """Move to GPU 0 when faiss was built with GPU support and one is present (not HNSW)."""
    faiss = import_faiss()
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is None:
        use_gpu = has_gpu and kind != "hnsw"  # faiss has no GPU HNSW
    if not use_gpu:
        return index, False, None
    if not has_gpu:
        raise ValueError("use_gpu=True but faiss has no GPU support or sees no GPU")
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), True, resources


def build_index(
    features: np.ndarray,
    kind: str = "flat",
    *,
    normalize: bool = True,
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    ef_search: int = 128,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> SearchIndex:
    """An index over `features` (N, D); every kind answers `search(queries, k)` the same way.

    kind: "flat" (exact FAISS, the default), "ivf" (nlist lists, default about sqrt(N), trained
    on these features; `nprobe` lists searched), "hnsw" (`hnsw_m` links, `ef_construction`,
    `ef_search`), or "exact" (torch, no FAISS). `normalize` L2-normalises the features and
    every query, so the inner-product score is the cosine similarity. `use_gpu=None` moves
    FAISS indexes to the GPU when faiss has GPU support and sees a GPU.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    features = _as_rows(features, "features")
    if kind == "exact":
        return ExactIndex(features, normalize=normalize)
    faiss = import_faiss()
    data = l2_normalize(features) if normalize else features
    n, dim = data.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        # sqrt(N) lists, but no more than N/39: faiss wants about 39 training points per list.
        nlist = nlist or max(1, min(round(math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(data)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    index.add(data)
    index, on_gpu, resources = _maybe_to_gpu(index, kind, use_gpu)
    return FaissIndex(index, kind, normalize=normalize, on_gpu=on_gpu, _gpu_resources=resources)


# --------------------------------------------------------------------------------------------
# Index folders: index.faiss, meta.csv, features.npy, info.json


@dataclass
class IndexFolder:
    """A loaded index folder. `features` is a read-only memory map: rows load when touched.

    As a gallery (see `reidkit.retrieval.gallery`), it searches with metadata filters: the
    filter picks rows from meta.csv, and a FAISS ID selector keeps the index to them.
    """

    folder: Path
    index: SearchIndex
    meta: pd.DataFrame
    info: dict[str, Any]
    features: np.ndarray

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def name(self) -> str:
        return str(self.folder)

    @property
    def fields(self) -> tuple[str, ...]:
        """The metadata fields at least one row knows (folders before frames and times were
        recorded simply lack those columns)."""
        return known_fields(self.meta)

    def search(
        self, queries: np.ndarray, k: int, *, where: GalleryFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (scores descending, row numbers into `meta`; -1 where none) among the
        rows `where` keeps."""
        if where is None or where.is_empty:
            return self.index.search(queries, k)
        where.check_fields(self.fields, self.name)
        return self.index.search(queries, k, rows=np.flatnonzero(where.mask(self.meta)))

    def rows_meta(self, rows: np.ndarray) -> pd.DataFrame:
        """The metadata of `rows` (row numbers), in their order."""
        return self.meta.iloc[np.asarray(rows, dtype=np.int64)].reset_index(drop=True)


def known_fields(meta: pd.DataFrame) -> tuple[str, ...]:
    """The META_FIELDS that `meta` has and that at least one row knows (not -1, not empty)."""
    known = []
    for name in META_FIELDS:
        if name not in meta.columns:
            continue
        column = meta[name]
        if name == "path":
            present = bool((column.astype(str) != "").any())
        else:
            present = bool((column.to_numpy(np.int64) != UNKNOWN).any())
        if present:
            known.append(name)
    return tuple(known)


def _rebuild_hint(folder: Path, info: dict[str, Any] | None = None) -> str:
    """The `extract` command that rebuilds `folder`: into it when extract may write there (it
    is new, empty or an index folder), else into a new folder, which extract accepts."""
    checkpoint = (info or {}).get("checkpoint") or "CHECKPOINT"
    try:
        check_owned_folder("--out", folder, INDEX_MARKER, "an index folder")
    except ReidkitError:
        what = "a file" if os.path.lexists(folder) and not folder.is_dir() else "not an index"
        return (
            f"{folder} is {what}, so build an index into a new folder: "
            f"`reidkit extract {checkpoint} --out NEW_FOLDER`"
        )
    return f"rebuild it with `reidkit extract {checkpoint} --out {folder}`"


def is_index_folder(folder: Path) -> bool:
    """True for a folder written by `save_index_folder` (it carries INDEX_MARKER)."""
    return folder.is_dir() and (folder / INDEX_MARKER).is_file()


def check_replaceable(folder: Path, option: str = "--out") -> None:
    """Refuse a destination that exists and is neither empty nor a reidkit index folder; the
    folder that `save_index_folder` replaces is never one of someone's own."""
    try:
        check_owned_folder(option, folder, INDEX_MARKER, "an index folder")
    except ReidkitError as err:
        raise IndexFolderError(str(err)) from None


def save_index_folder(
    folder: str | Path,
    index: SearchIndex,
    features: np.ndarray,
    meta: pd.DataFrame,
    info: dict[str, Any],
) -> Path:
    """Write index.faiss, meta.csv (path, pid, camid), features.npy and info.json, atomically.

    `info` must hold "checkpoint" (path of the checkpoint that made the features) and
    "feature_kind" (which embedding, e.g. "pool-12288"); the dimension, row count, index kind,
    normalisation, search settings and reidkit version are added here. Everything is written
    into a hidden temporary folder beside `folder`, which then takes the folder's place: an
    interrupted save leaves `folder` as it was (a previous index stays loadable) and never a
    partial folder at that path.
    """
    folder = Path(folder)
    features = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    missing = [key for key in CALLER_INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"info needs {', '.join(missing)} (of {', '.join(CALLER_INFO_KEYS)})")
    absent = [c for c in META_COLUMNS if c not in meta.columns]
    if absent:
        raise ValueError(f"meta lacks column(s) {', '.join(absent)}; it needs path, pid, camid")
    if features.ndim != 2 or features.shape[1] != index.dim:
        raise ValueError(
            f"features shape {features.shape} does not fit an index of dim {index.dim}"
        )
    if not len(meta) == len(features) == index.ntotal:
        raise ValueError(
            f"rows disagree: meta {len(meta)}, features {len(features)}, index {index.ntotal}"
        )
    faiss = import_faiss()
    if isinstance(index, FaissIndex):
        cpu_index = index.cpu_index()
        search_params = index.search_params()
    else:  # exact: store an exact flat FAISS index of the same rows, so any reader can search
        cpu_index = faiss.IndexFlatIP(index.dim)
        cpu_index.add(index.features)
        search_params = {}
    full_info = {
        **info,
        "dim": int(index.dim),
        "num_rows": int(index.ntotal),
        "index_kind": index.kind,
        "normalized": bool(index.normalize),
        "reidkit_version": __version__,
        **search_params,
    }

    check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder is renamed into place and should get the umask's
    # permissions (others may read a shared index), not mkdtemp's owner-only 0700
    tmp = temporary_path(folder)
    old: Path | None = None
    try:
        tmp.mkdir()
        # the marker first: a folder with anything of reidkit's in it says whose it is
        (tmp / INDEX_MARKER).write_text(
            "a gallery index written by `reidkit extract`; it may replace this folder\n"
        )
        faiss.write_index(cpu_index, str(tmp / "index.faiss"))
        meta.loc[:, list(META_COLUMNS) + [c for c in meta.columns if c not in META_COLUMNS]].to_csv(
            tmp / "meta.csv", index=False
        )
        np.save(tmp / "features.npy", features, allow_pickle=False)
        (tmp / "info.json").write_text(
            json.dumps(full_info, indent=2, sort_keys=True, default=str) + "\n"
        )
        if folder.exists():
            # A directory cannot be renamed onto a non-empty one: move the old aside first,
            # so the window without a folder is two renames long, and it is never partial.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "previous")
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old is not None:
                os.replace(old / "previous", folder)
            raise
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk: name the folder, not the temporary one
            raise named_os_error(err, folder) from None
        if isinstance(err, RuntimeError) and "write" in str(err).lower():  # faiss's own words
            raise IndexFolderError(
                f"cannot write index folder {folder}: {str(err).strip().splitlines()[-1]}; "
                "free some disk space or choose another --out"
            ) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _read_info(folder: Path) -> dict[str, Any]:
    path = folder / "info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFolderError(
            f"{path} is not valid JSON ({err}); {_rebuild_hint(folder)}"
        ) from None
    if not isinstance(info, dict):
        raise IndexFolderError(f"{path} must hold a JSON object; {_rebuild_hint(folder)}")
    missing = [key for key in INFO_KEYS if key not in info]
    if missing:
        raise IndexFolderError(f"{path} lacks {', '.join(missing)}; {_rebuild_hint(folder, info)}")
    for key in ("dim", "num_rows"):
        if not isinstance(info[key], int) or isinstance(info[key], bool) or info[key] < 0:
            raise IndexFolderError(
                f"{path}: {key} must be a non-negative integer, got {info[key]!r}; "
                f"{_rebuild_hint(folder, info)}"
            )
    if info["index_kind"] not in KINDS:
        raise IndexFolderError(
            f"{path}: unknown index_kind {info['index_kind']!r} (expected one of "
            f"{', '.join(KINDS)}); {_rebuild_hint(folder, info)}"
        )
    return info


def _integer_column(values: pd.Series, column: str, path: Path, hint: str) -> pd.Series:
    """meta.csv's pid or camid column as int64, or one line naming the first bad row."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | ~np.isfinite(numbers) | (numbers != numbers.round())
    bad |= numbers.abs() >= 2**63  # beyond int64
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raw = values.iloc[row]
        text = "" if pd.isna(raw) else str(raw)  # an empty cell reads as NaN
        raise IndexFolderError(
            f"{path} line {row + 2}: {column} {text!r} is not an integer; {hint}"
        )
    return numbers.astype(np.int64)


def load_index_folder(folder: str | Path, *, use_gpu: bool | None = None) -> IndexFolder:
    """Load and cross-check a folder written by `save_index_folder`.

    A missing file, malformed info.json, or rows/dimensions that disagree between info.json,
    meta.csv, features.npy and index.faiss raise IndexFolderError naming the file and the fix.
    Nothing is unpickled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IndexFolderError(f"no index folder at {folder}; {_rebuild_hint(folder)}")
    absent = [name for name in FOLDER_FILES if not (folder / name).is_file()]
    if absent:
        raise IndexFolderError(
            f"index folder {folder} is incomplete: {', '.join(absent)} missing; "
            f"{_rebuild_hint(folder)}"
        )
    info = _read_info(folder)
    hint = _rebuild_hint(folder, info)
    rows, dim = info["num_rows"], info["dim"]

    meta_path = folder / "meta.csv"
    try:
        # ids as text: a big or odd value is refused as written, not as pandas parsed it
        meta = pd.read_csv(meta_path, dtype={"pid": str, "camid": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise IndexFolderError(f"{meta_path} is unreadable ({err}); {hint}") from None
    absent = [c for c in META_COLUMNS if c not in meta.columns]
    if absent:
        raise IndexFolderError(f"{meta_path} lacks column(s) {', '.join(absent)}; {hint}")
    if len(meta) != rows:
        raise IndexFolderError(
            f"{meta_path} has {len(meta)} rows but info.json says {rows}; {hint}"
        )
    if rows == 0:
        raise IndexFolderError(f"{folder} holds no gallery rows, so nothing to search; {hint}")
    for column in ("pid", "camid"):
        meta[column] = _integer_column(meta[column], column, meta_path, hint)
    meta["path"] = meta["path"].astype(str)

    feats_path = folder / "features.npy"
    try:
        features = np.load(feats_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IndexFolderError(f"{feats_path} is unreadable ({err}); {hint}") from None
    if features.dtype != np.float32 or features.shape != (rows, dim):
        raise IndexFolderError(
            f"{feats_path} holds {features.dtype} {features.shape}, info.json says float32 "
            f"({rows}, {dim}); {hint}"
        )

    faiss = import_faiss()
    index_path = folder / "index.faiss"
    try:
        cpu_index = faiss.read_index(str(index_path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise IndexFolderError(f"{index_path} is unreadable ({first_line}); {hint}") from None
    if cpu_index.ntotal != rows or cpu_index.d != dim:
        raise IndexFolderError(
            f"{index_path} holds {cpu_index.ntotal} rows of dimension {cpu_index.d}, info.json "
            f"says {rows} of {dim}; {hint}"
        )

    kind, normalize = info["index_kind"], bool(info["normalized"])
    index: SearchIndex
    if kind == "exact":
        index = ExactIndex(np.asarray(features), normalize=normalize)
    else:
        if kind == "ivf" and "nprobe" in info:
            faiss.extract_index_ivf(cpu_index).nprobe = int(info["nprobe"])
        if kind == "hnsw" and "ef_search" in info:
            faiss.downcast_index(cpu_index).hnsw.efSearch = int(info["ef_search"])
        gpu_index, on_gpu, resources = _maybe_to_gpu(cpu_index, kind, use_gpu)
        index = FaissIndex(gpu_index, kind, normalize, on_gpu, resources)
    return IndexFolder(folder=folder, index=index, meta=meta, info=info, features=features)
