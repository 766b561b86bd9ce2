"""Gallery indexes from a checkpoint (`extract`) and query-image search against them (`search`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from reidkit import __version__
from reidkit.config import RunConfig, checkpoint_data_root, data_root
from reidkit.data.datasets import dataset_folder, parse_market_name
from reidkit.data.loading import build_loader, manifest_path, read_manifest
from reidkit.engine.checkpoint import checkpoint_digest, load_model
from reidkit.engine.distributed import Distributed, init_distributed, process_device
from reidkit.engine.extract import extract_features
from reidkit.engine.metadata import gallery_metadata
from reidkit.engine.shards import SHARD_SIZE, ShardRun, agree, extract_in_shards, image_list_digest
from reidkit.errors import DatasetError, IndexFolderError
from reidkit.outputs import check_writable
from reidkit.retrieval.filters import GalleryFilter
from reidkit.retrieval.gallery import Gallery, open_gallery
from reidkit.retrieval.index import build_index, check_replaceable, save_index_folder
from reidkit.retrieval.milvus import (
    GalleryWriter,
    MilvusGallery,
    MilvusTarget,
    check_destination,
    is_milvus,
    parse_target,
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


@dataclass(frozen=True)
class ExtractResult:
    """What `extract` wrote, and how the embedding went (rank 0's view)."""

    out: Path | str  # the index folder, or the milvus:... address
    collection: str | None  # the Milvus collection; None for a folder
    num_images: int
    shards: int  # feature shards in all
    resumed: int  # shards an earlier, interrupted run had finished
    embedded: int  # images this run embedded, over all processes
    seconds: float
    world_size: int  # processes that embedded

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def default_shards(out: Path | str, collection: str | None = None) -> Path:
    """Where the feature shards of an extraction go unless --shards says: beside the output
    (`runs/index.shards/`, `gallery.db.shards/`), or `runs/COLLECTION.shards/` for a server."""
    if is_milvus(out):
        target = parse_target(str(out), collection)
        if not target.is_lite:
            return Path("runs") / f"{target.collection}.shards"
        return Path(f"{target.uri}.shards")
    return Path(f"{out}.shards")


def build_gallery_index(
    checkpoint: Path,
    out: Path | str | None = None,
    *,
    dataset: str | None = None,
    split: str = "gallery",
    images: Path | None = None,
    root: Path | None = None,
    index_kind: str | None = None,
    flip: bool | None = None,
    feature: str | None = None,
    meta_csv: Path | None = None,
    collection: str | None = None,
    shards: Path | None = None,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
) -> ExtractResult | None:
    """Embed a split of a prepared dataset, or every image of a folder, into a gallery.

    `out` (default `runs/index/`) is an index folder, written atomically (index.faiss,
    features.npy, meta.csv, info.json), or `milvus:PATH.db` / `milvus:http://HOST:PORT`, a
    Milvus collection (`collection`, default reidkit_gallery) put in place whole. Either
    records the checkpoint and its SHA-256, so `search` embeds queries the same way.
    `index_kind` (flat, ivf, hnsw) defaults to the checkpoint's `eval.index`; `meta_csv`
    adds frames and timestamps by path (see `reidkit.engine.metadata`).

    Under `torchrun` each process embeds a contiguous share of the images into feature
    shards (`shards`, default beside the output), and rank 0 writes the gallery; an
    interrupted run resumes from the finished shards (see `reidkit.engine.shards`).
    Returns the result on rank 0, None on the other ranks.
    """
    if dataset is not None and images is not None:
        raise DatasetError("give either --dataset (with --split) or --images FOLDER, not both")
    if dataset is None and images is None:
        raise DatasetError(
            "give either --dataset NAME (with --split) to embed a prepared dataset or "
            "--images FOLDER to embed a folder of images"
        )
    out = out if out is not None else DEFAULT_INDEX
    target = parse_target(str(out), collection) if is_milvus(out) else None
    place = init_distributed()
    try:
        return _build_gallery(
            checkpoint, out, target, place, dataset=dataset, split=split, images=images,
            root=root, index_kind=index_kind, flip=flip, feature=feature, meta_csv=meta_csv,
            shards=shards, shard_size=shard_size, progress=progress,
        )  # fmt: skip
    finally:
        if place.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _build_gallery(
    checkpoint: Path,
    out: Path | str,
    target: MilvusTarget | None,
    place: Distributed,
    *,
    dataset: str | None,
    split: str,
    images: Path | None,
    root: Path | None,
    index_kind: str | None,
    flip: bool | None,
    feature: str | None,
    meta_csv: Path | None,
    shards: Path | None,
    shard_size: int,
    progress: bool,
) -> ExtractResult | None:
    if target is None:
        agree(place, lambda: check_index_out(Path(out), images, checkpoint))
    model, state = load_model(checkpoint)
    root = checkpoint_data_root(root, state.config.data.root)
    config = _eval_config(state.config, root=root, flip=flip, feature=feature)
    digest = agree(place, lambda: checkpoint_digest(Path(checkpoint)))
    model_info = {
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "checkpoint_sha256": digest,
        "feature_kind": config.eval.feature,
        "flip": config.eval.flip,
    }
    if target is not None:
        agree(place, lambda: check_destination(target, model_info))
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
    meta = gallery_metadata(rows, meta_csv)
    run = ShardRun(
        checkpoint_sha256=digest,
        feature_kind=config.eval.feature,
        flip=config.eval.flip,
        images_sha256=image_list_digest(meta["path"].tolist()),
        num_images=len(meta),
    )
    device = process_device(place)
    sharded = extract_in_shards(
        model.to(device),
        rows,
        config.data,
        run=run,
        folder=Path(shards)
        if shards is not None
        else default_shards(out, getattr(target, "collection", None)),
        place=place,
        device=device,
        batch_size=config.eval.batch_size,
        feature=config.eval.feature,
        flip=config.eval.flip,
        shard_size=shard_size,
        progress=progress,
    )
    if sharded is None:  # not rank 0: its shards are written, rank 0 writes the gallery
        return None
    kind = index_kind or config.eval.index
    info = {
        **model_info,
        "source": source,
        "preset": config.name,
        "input_size": [config.data.height, config.data.width],
        "reidkit": __version__,
    }
    if target is None:
        features = sharded.features()
        save_index_folder(out, build_index(features, kind), features, meta, info)
    else:
        dim = next(sharded.blocks())[2].shape[1]
        with GalleryWriter(
            target, dim=dim, num_rows=len(meta), index_kind=kind, info=info
        ) as writer:
            for start, stop, features in sharded.blocks():
                writer.add(features, meta.iloc[start:stop])
            writer.commit()
    sharded.folder.remove()
    return ExtractResult(
        out=out,
        collection=None if target is None else target.collection,
        num_images=len(meta),
        shards=sharded.total,
        resumed=sharded.resumed,
        embedded=sharded.embedded,
        seconds=sharded.seconds,
        world_size=sharded.world_size,
    )


def search_index(
    query_paths: list[Path],
    index: Path | str | None = None,
    *,
    top: int = 10,
    where: GalleryFilter | None = None,
    collection: str | None = None,
    progress: bool = False,
) -> list[QueryResult]:
    """Embed query images with the gallery's checkpoint and return each one's top matches.

    `index` is an index folder (default `runs/index/`) or a `milvus:...` address (with
    `collection`); `where` keeps only the gallery rows it matches (camera, time, path).
    """
    if top < 1:
        raise IndexFolderError("--top must be at least 1")
    gallery = _open_search_gallery(index, collection)
    try:
        return _search_gallery(gallery, query_paths, top, where, progress)
    finally:
        if isinstance(gallery, MilvusGallery):
            gallery.close()


def _search_gallery(
    gallery: Gallery,
    query_paths: list[Path],
    top: int,
    where: GalleryFilter | None,
    progress: bool,
) -> list[QueryResult]:
    if not str(gallery.info.get("checkpoint") or "").strip():
        # GalleryIndex.build(...) without model= records none: search cannot embed queries
        raise IndexFolderError(
            f"{gallery.name} names no checkpoint (its info.json has an empty 'checkpoint'), so "
            "search cannot embed the queries as the gallery was embedded; rebuild it with "
            "`reidkit extract CHECKPOINT --out NEW_FOLDER`, or in Python with "
            "GalleryIndex.build(..., model=load_model(CHECKPOINT))"
        )
    checkpoint = Path(gallery.info["checkpoint"])
    if not checkpoint.exists():
        raise IndexFolderError(
            f"{gallery.name} was built from {checkpoint}, which no longer exists; build the "
            "gallery again with `reidkit extract`"
        )
    recorded = gallery.info.get("checkpoint_sha256")
    if recorded and checkpoint_digest(checkpoint) != recorded:
        raise IndexFolderError(
            f"{checkpoint} has changed since {gallery.name} was built from it (its SHA-256 "
            "differs), so queries would be embedded by other weights; build the gallery again "
            "with `reidkit extract`"
        )
    if where is not None:
        where.check_fields(gallery.fields, gallery.name)
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
        flip=bool(gallery.info.get("flip", False)),
        feature=str(gallery.info["feature_kind"]),
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
    if features.shape[1] != gallery.dim:
        raise IndexFolderError(
            f"{gallery.name} holds {gallery.dim}-d features but its checkpoint now gives "
            f"{features.shape[1]}-d ones; build the gallery again with `reidkit extract`"
        )
    scores, indices = gallery.search(features, min(top, gallery.ntotal), where=where)
    found = indices[indices >= 0]  # approximate indexes and filters leave -1 where none
    meta = gallery.rows_meta(found)
    by_row = {int(row): record for row, record in zip(found, meta.to_dict("records"), strict=True)}
    results = []
    for query, row_scores, row_indices in zip(queries, scores, indices, strict=True):
        matches = tuple(
            Match(
                rank=rank,
                score=float(score),
                path=str(by_row[int(i)]["path"]),
                pid=int(by_row[int(i)]["pid"]),
                camid=int(by_row[int(i)]["camid"]),
            )
            for rank, (score, i) in enumerate(zip(row_scores, row_indices, strict=True), start=1)
            if i >= 0
        )
        pid = query["pid"]
        results.append(QueryResult(Path(query["path"]), None if pid == UNKNOWN else pid, matches))
    return results


def _open_search_gallery(index: Path | str | None, collection: str | None) -> Gallery:
    if is_milvus(index):
        return open_gallery(str(index), collection)
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
    return open_gallery(folder)


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
