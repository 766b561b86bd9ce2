"""Gallery indexes from a checkpoint (`extract`) and query-image search against them (`search`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reidkit import __version__
from reidkit.config import RunConfig, checkpoint_data_root, data_root
from reidkit.data.datasets import dataset_folder, parse_market_name
from reidkit.data.loading import build_loader, manifest_path, read_manifest
from reidkit.engine.checkpoint import load_model
from reidkit.engine.extract import extract_features
from reidkit.errors import DatasetError, IndexFolderError
from reidkit.outputs import check_writable
from reidkit.retrieval.index import (
    build_index,
    check_replaceable,
    load_index_folder,
    save_index_folder,
)
from reidkit.retrieval.visualize import MontageRow, save_ranked_montage_grid

# Where `extract` writes without --out, and where `search` looks without --index.
DEFAULT_INDEX = Path("runs") / "index"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
UNKNOWN = -1  # pid / camid of an image whose file name does not carry them
# Ranked images per query in the montage: 20 tiles are about 1,600 pixels wide; `--top 100000`
# would be a 7-million-pixel-wide PNG. The table lists every match.
MONTAGE_COLUMNS = 20


@dataclass(frozen=True)
class Match:
    """One ranked gallery image."""

    rank: int
    score: float  # cosine similarity of the embeddings, in [-1, 1]
    path: str
    pid: int
    camid: int


@dataclass(frozen=True)
class QueryResult:
    """A query image and its top-k gallery matches, best first."""

    query: Path
    query_pid: int | None  # from the file name when it follows the PID_cCAM layout
    matches: tuple[Match, ...]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eval_config(config: RunConfig, *, root: Path | None, flip: bool | None, feature: str | None):
    data = replace(config.data, root=str(root)) if root is not None else config.data
    evaluation = config.eval
    if flip is not None:
        evaluation = replace(evaluation, flip=flip)
    if feature is not None:
        evaluation = replace(evaluation, feature=feature)
    return replace(config, data=data, eval=evaluation)


def folder_images(folder: Path) -> pd.DataFrame:
    """Every image under `folder` (sorted), with pid and camera read from Market-style names.

    Names that do not start with `PID_cCAM` get pid and camid -1 (unknown).
    """
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise DatasetError(f"--images {folder} is a file; give the folder that holds the images")
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist")
    # regular files only: a pipe or device named *.jpg would block or never end when read
    paths = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not paths:
        raise DatasetError(f"{folder} holds no .jpg/.png images")
    pids, camids = zip(*(_name_ids(p) for p in paths), strict=True)
    return pd.DataFrame(
        {
            "path": [str(p.resolve()) for p in paths],
            "pid": np.array(pids, dtype=np.int64),
            "camid": np.array(camids, dtype=np.int64),
            "split": "gallery",
        }
    )


def _name_ids(path: Path) -> tuple[int, int]:
    """(pid, camid) from a name that starts `PID_cCAM`; (UNKNOWN, UNKNOWN) for any other name."""
    return parse_market_name(path.name) or (UNKNOWN, UNKNOWN)


def check_index_out(out: Path, images: Path | None = None, checkpoint: Path | None = None) -> None:
    """Refuse an index destination that would delete something reidkit did not write.

    `out` may be new, empty or a reidkit index folder (which is replaced); never a file, a
    folder of other files, the --images folder, a folder inside it, a folder that holds it,
    or a folder that holds the checkpoint.
    """
    out = Path(out).expanduser()
    if checkpoint is not None:
        held = Path(checkpoint).expanduser().resolve()
        if out.resolve() in held.parents:
            raise IndexFolderError(
                f"--out {out} holds the checkpoint {checkpoint}; writing the index there would "
                "replace the folder and the checkpoint with it: choose an --out outside it"
            )
    if images is not None:
        source, target = Path(images).expanduser().resolve(), out.resolve()
        if target == source or source in target.parents or target in source.parents:
            where = (
                "is" if target == source else "is inside" if source in target.parents else "holds"
            )
            raise IndexFolderError(
                f"--out {out} {where} the --images folder {images}; writing the index there "
                "would replace the images: choose an --out outside it"
            )
    check_replaceable(out)
    check_writable("--out", out, folder=True)


def build_gallery_index(
    checkpoint: Path,
    out: Path | None = None,
    *,
    dataset: str | None = None,
    split: str = "gallery",
    images: Path | None = None,
    root: Path | None = None,
    index_kind: str | None = None,
    flip: bool | None = None,
    feature: str | None = None,
    progress: bool = True,
) -> Path:
    """Embed a split of a prepared dataset, or every image of a folder, into an index folder.

    Writes `out` (default `runs/index/`) atomically: index.faiss, features.npy, meta.csv and
    info.json, which records the checkpoint so that `search` embeds queries the same way.
    `index_kind` (flat, ivf, hnsw) defaults to the checkpoint's `eval.index`.
    """
    if dataset is not None and images is not None:
        raise DatasetError("give either --dataset (with --split) or --images FOLDER, not both")
    if dataset is None and images is None:
        raise DatasetError(
            "give either --dataset NAME (with --split) to embed a prepared dataset or "
            "--images FOLDER to embed a folder of images"
        )
    out = Path(out) if out is not None else DEFAULT_INDEX
    check_index_out(out, images, checkpoint)
    model, state = load_model(checkpoint)
    root = checkpoint_data_root(root, state.config.data.root)
    config = _eval_config(state.config, root=root, flip=flip, feature=feature)
    if images is not None:
        rows, source = folder_images(images), str(Path(images).expanduser().resolve())
    else:
        name = dataset_folder(dataset)
        frame = read_manifest(manifest_path(data_root(config.data.root), name))
        rows = frame[frame["split"] == split].reset_index(drop=True)
        if rows.empty:
            raise DatasetError(f"dataset {name!r} has no {split} images")
        source = f"{name}:{split}"
        rows = rows.assign(split="gallery")
    device = _device()
    loader = build_loader(
        rows,
        "gallery",
        config.data,
        batch_size=config.eval.batch_size,
        train=False,
        pin_memory=device.type == "cuda",
    )
    features = extract_features(
        model.to(device),
        loader,
        feature=config.eval.feature,
        flip=config.eval.flip,
        device=device,
        progress=progress,
        description=f"embed {len(rows):,} images",
    )
    index = build_index(features, index_kind or config.eval.index)
    info = {
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "feature_kind": config.eval.feature,
        "flip": config.eval.flip,
        "source": source,
        "preset": config.name,
        "input_size": [config.data.height, config.data.width],
        "reidkit": __version__,
    }
    meta = rows[["path", "pid", "camid"]].reset_index(drop=True)
    return save_index_folder(out, index, features, meta, info)


def search_index(
    query_paths: list[Path],
    index: Path | None = None,
    *,
    top: int = 10,
    progress: bool = False,
) -> list[QueryResult]:
    """Embed query images with the index's checkpoint and return each one's top matches."""
    folder = Path(index) if index is not None else DEFAULT_INDEX
    if not folder.exists():
        raise IndexFolderError(
            f"no gallery index at {folder}; build one with `reidkit extract CHECKPOINT "
            f"--dataset NAME{'' if index is None else f' --out {folder}'}`"
        )
    if folder.is_file():
        raise IndexFolderError(
            f"--index {folder} is a file; give the folder `reidkit extract` wrote (it holds "
            "index.faiss, features.npy, meta.csv and info.json)"
        )
    if top < 1:
        raise IndexFolderError("--top must be at least 1")
    loaded = load_index_folder(folder)
    if not str(loaded.info["checkpoint"] or "").strip():
        # GalleryIndex.build(...) without model= records none: search cannot embed queries
        raise IndexFolderError(
            f"{folder} names no checkpoint (its info.json has an empty 'checkpoint'), so search "
            "cannot embed the queries as the gallery was embedded; rebuild it with "
            "`reidkit extract CHECKPOINT --out NEW_FOLDER`, or in Python with "
            "GalleryIndex.build(..., model=load_model(CHECKPOINT))"
        )
    checkpoint = Path(loaded.info["checkpoint"])
    if not checkpoint.exists():
        raise IndexFolderError(
            f"{folder} was built from {checkpoint}, which no longer exists; rebuild the index "
            "with `reidkit extract`"
        )
    queries = []
    for path in query_paths:
        path = Path(path).expanduser()
        if path.is_dir():
            raise DatasetError(
                f"query image {path} is a folder; give image files (e.g. {path}/*.jpg)"
            )
        if not path.is_file():
            raise DatasetError(f"query image {path} does not exist")
        pid, camid = _name_ids(path)
        queries.append({"path": str(path.resolve()), "pid": pid, "camid": camid, "split": "query"})
    model, state = load_model(checkpoint)
    config = _eval_config(
        state.config,
        root=None,
        flip=bool(loaded.info.get("flip", False)),
        feature=str(loaded.info["feature_kind"]),
    )
    device = _device()
    loader = build_loader(
        pd.DataFrame(queries), "query", config.data, batch_size=config.eval.batch_size, train=False
    )
    features = extract_features(
        model.to(device),
        loader,
        feature=config.eval.feature,
        flip=config.eval.flip,
        device=device,
        progress=progress,
    )
    if features.shape[1] != loaded.index.dim:
        raise IndexFolderError(
            f"{folder} holds {loaded.index.dim}-d features but its checkpoint now gives "
            f"{features.shape[1]}-d ones; rebuild the index with `reidkit extract`"
        )
    scores, indices = loaded.index.search(features, min(top, loaded.index.ntotal))
    meta = loaded.meta
    results = []
    for query, row_scores, row_indices in zip(queries, scores, indices, strict=True):
        matches = tuple(
            Match(
                rank=rank,
                score=float(score),
                path=str(meta["path"].iloc[i]),
                pid=int(meta["pid"].iloc[i]),
                camid=int(meta["camid"].iloc[i]),
            )
            for rank, (score, i) in enumerate(zip(row_scores, row_indices, strict=True), start=1)
            if i >= 0  # approximate indexes mark unfilled slots with -1
        )
        pid = query["pid"]
        results.append(QueryResult(Path(query["path"]), None if pid == UNKNOWN else pid, matches))
    return results


def save_results_montage(
    results: list[QueryResult], out: Path, *, columns: int = MONTAGE_COLUMNS
) -> Path:
    """One row per query: the query, then its first `columns` ranked matches with
    green/red/grey borders."""
    rows = [
        MontageRow(
            query_path=result.query,
            ranked_paths=[m.path for m in result.matches[:columns]],
            query_pid=result.query_pid,
            ranked_pids=[None if m.pid == UNKNOWN else m.pid for m in result.matches[:columns]],
            scores=[m.score for m in result.matches[:columns]],
        )
        for result in results
    ]
    return save_ranked_montage_grid(rows, out)
