"""Query/gallery evaluation: extract, rank, CMC/mAP/mINP; shared by `evaluate` and training."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reidkit.config import (
    PaperRow,
    RunConfig,
    available_presets,
    checkpoint_data_root,
    data_root,
    load_preset,
    setting_text,
)
from reidkit.data.datasets import DATASETS, LIST_DATASETS, MANIFEST_NAME, dataset_folder
from reidkit.data.loading import build_loader, manifest_path, read_manifest
from reidkit.data.prepare import CAMID_NOTE, RECORD_NAME
from reidkit.engine.checkpoint import checkpoint_digest, load_model
from reidkit.engine.extract import extract_features
from reidkit.errors import DatasetError
from reidkit.models.net import ReidNet
from reidkit.retrieval.gallery import Gallery, check_model, open_gallery
from reidkit.retrieval.metrics import (
    MatchRanks,
    RankingMetrics,
    chance_rank1,
    cmc_map,
    cmc_map_from_features,
    match_ranks,
    metrics_from_ranks,
)
from reidkit.retrieval.rerank import k_reciprocal_rerank_features

# k-reciprocal re-ranking as its authors evaluate (Zhong et al., CVPR 2017); R(i, k1) needs
# k1 + 1 neighbours, so a set of fewer query + gallery images cannot be re-ranked.
RERANK_K1, RERANK_K2, RERANK_LAMBDA = 20, 6, 0.3
# Re-ranking returns the whole query x gallery matrix (and costs one all-images distance
# product), so it is refused above 2^28 pairs, 1 GiB of float32: five times Market-1501's
# 53.6 million, so every benchmark fits but MSMT17 (11,659 x 82,161: 3.6 GiB, and 93,820^2
# all-images distances). Plain evaluation holds one chunk of queries at a time at any size.
RERANK_MAX_PAIRS = 1 << 28


@dataclass(frozen=True)
class EvaluationReport:
    """Metrics of one evaluation and everything needed to read them correctly."""

    dataset: str
    preset: str
    metrics: RankingMetrics
    num_query: int
    num_gallery: int
    feature: str
    flip: bool
    rerank: bool
    # The published row for this preset and dataset, shown only when the run compares with it
    # (see `paper_reference`); otherwise `paper_note` says why there is none.
    paper: PaperRow | None
    seconds: dict[str, float] = field(default_factory=dict)
    # False for a custom dataset prepared without camera ids: nothing is dropped as a
    # same-camera match, so the scores cannot be compared with published ones.
    camera_rule: bool = True
    chance_rank1: float | None = None  # rank-1 of a random ranking, in [0, 1], for scale
    query_ids: int | None = None  # identities among the queries
    gallery_ids: int | None = None  # identities in the gallery, distractors (pid 0) one
    checkpoint: str | None = None  # the file evaluated, absolute; None inside training
    gallery: str | None = None  # a gallery ranked where it lives (Milvus, a folder); None: embedded
    paper_note: str | None = None  # why no published row is shown beside the scores
    manifest: str | None = None  # the dataset's manifest.csv, absolute
    manifest_sha256: str | None = None  # its digest: which exact dataset was evaluated

    @property
    def protocol(self) -> str:
        """The protocol in words, as the table's line and `--json` state it."""
        if self.camera_rule:
            return "single query; same pid and camera removed"
        return (
            "single query; camera rule off: the dataset has no camera ids, so no same-camera "
            "match is removed and the scores are not comparable with published results"
        )

    def as_dict(self) -> dict:
        """Plain data for `--json`: ranks and metrics in percent, the protocol and what was
        evaluated on what, so that a results file can be traced."""
        m = self.metrics
        return {
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "preset": self.preset,
            "rank1": 100 * m.rank(1),
            "rank5": 100 * m.rank(min(5, len(m.cmc))),
            "rank10": 100 * m.rank(min(10, len(m.cmc))),
            "mAP": 100 * m.mAP,
            "mINP": 100 * m.mINP,
            "cmc": [100 * float(v) for v in m.cmc],
            "chance_rank1": None if self.chance_rank1 is None else 100 * self.chance_rank1,
            "valid_queries": m.num_valid_queries,
            "skipped_queries": m.num_skipped_queries,
            "averaged_queries": m.num_averaged_queries,
            "num_query": self.num_query,
            "num_gallery": self.num_gallery,
            "query_ids": self.query_ids,
            "gallery_ids": self.gallery_ids,
            "protocol": self.protocol,
            "camera_rule": self.camera_rule,
            "comparable_with_published": self.camera_rule,
            "ap_mode": m.ap_mode,
            "feature": self.feature,
            "flip": self.flip,
            "rerank": self.rerank,
            "paper": None if self.paper is None else vars(self.paper),
            "gallery": self.gallery,
            "paper_note": self.paper_note,
            "manifest": self.manifest,
            "manifest_sha256": self.manifest_sha256,
            "seconds": self.seconds,
        }


def has_camera_ids(folder: Path) -> bool:
    """False when the dataset's cameras are stand-ins: `prepare` gives a custom CSV without a
    camid column camera 0 for every query and 1 for every other image.

    Read from the dataset's record (dataset.json); a manifest without one (written by hand)
    has a camid column, so its cameras count as real.
    """
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    if not isinstance(record, dict):
        return True
    # datasets prepared before the record had the key carry the note instead
    return bool(record.get("camera_ids", CAMID_NOTE not in record.get("notes", [])))


def manifest_sha256(path: Path) -> str | None:
    """The digest of a manifest file (None when there is none): a re-prepared dataset with
    other images or splits has another one, so results kept for the old one can be told apart."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# What makes a run the one a published row measured: the model (with the attention settings
# the paper's Tables 2-4 vary), its initialisation, the input size and the training length.
# Other keys (batch size, rates, workers) may be tuned.
COMPARABLE_KEYS = (
    ("model", "arch"),
    ("model", "pretrained"),
    ("model", "head"),
    ("attention", "kind"),
    ("attention", "stages"),
    ("attention", "groups"),
    ("attention", "grid"),
    ("data", "height"),
    ("data", "width"),
    ("train", "epochs"),
)


@dataclass(frozen=True)
class Reference:
    """The published row to print beside a run's scores, or why none is printed."""

    row: PaperRow | None
    note: str | None = None  # set exactly when `row` is None


def paper_reference(
    config: RunConfig,
    folder: Path,
    *,
    epoch: int | None = None,
    rerank: bool = False,
) -> Reference:
    """The preset's published row for the dataset in `folder`, when the run compares with it.

    A row is shown only beside a run that measured what the publication measured: an official
    dataset whose counts `prepare` verified against the published ones (its dataset.json says
    so), evaluated on the dataset the run trained on, without re-ranking, by a run that is its
    shipped preset's own in COMPARABLE_KEYS and has trained all its epochs (`epoch`, when
    known). Otherwise the note says, in one phrase, why not.
    """
    name = config.name
    if not config.paper:
        return Reference(None, f"preset {name} has no published numbers")
    record = _dataset_record(folder)
    official = record.get("dataset")
    if official not in DATASETS and official not in LIST_DATASETS:
        kind = f"a {official} dataset" if isinstance(official, str) else "not prepared by reidkit"
        return Reference(None, f"{folder.name} is {kind}, not an official benchmark")
    if record.get("verified") is not True:
        return Reference(
            None, f"{folder.name}'s counts were not verified against the published ones"
        )
    key = official
    if official in DATASETS and record.get("variant"):
        key = DATASETS[official].variant(record["variant"]).default_name
    if dataset_folder(config.data.dataset) != folder.name:
        return Reference(
            None,
            f"trained on {dataset_folder(config.data.dataset)}, evaluated on {folder.name}: "
            "the published rows train and test on one dataset",
        )
    if rerank:
        return Reference(None, "re-ranked: the published rows are without re-ranking")
    row = config.paper.get(key)
    if row is None:
        return Reference(None, f"preset {name} has no published row for {key}")
    if row.recipe:
        return Reference(None, anchor_note(name, key, row))
    presets = available_presets()
    if name not in presets:
        return Reference(None, f"{name} is not a shipped preset, so its settings cannot be checked")
    preset = load_preset(presets[name])
    differ = []
    for section, setting in COMPARABLE_KEYS:
        ours, theirs = (getattr(getattr(c, section), setting) for c in (config, preset))
        if ours != theirs:
            differ.append(
                f"{section}.{setting} {setting_text(ours)} (preset {setting_text(theirs)})"
            )
    if differ:
        return Reference(None, f"the run differs from preset {name}: {', '.join(differ)}")
    if epoch is not None and epoch < config.train.epochs:
        return Reference(
            None, f"the checkpoint has trained {epoch} of its {config.train.epochs} epochs"
        )
    return Reference(row)


def anchor_note(preset: str, dataset: str, row: PaperRow) -> str:
    """Why a row measured with another recipe (PaperRow.recipe) is not printed beside a run,
    with its numbers, so that the run can still be read against it."""
    return (
        f"preset {preset}'s {dataset} row ({row.source or 'published'}: R1 {row.rank1:g} / mAP "
        f"{row.mAP:g}) was measured with another recipe ({row.recipe}): an anchor to read the "
        "run against, not the same measurement"
    )


def _same_recipe(row: PaperRow | None) -> PaperRow | None:
    return None if row is None or row.recipe else row


def _dataset_record(folder: Path) -> dict:
    """The dataset's dataset.json ({} when missing or unreadable: not prepared by reidkit)."""
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def query_gallery(config: RunConfig, dataset: str | None = None) -> tuple[str, pd.DataFrame]:
    """(dataset name, manifest rows of the query and gallery splits) for a prepared dataset."""
    name = dataset_folder(dataset or config.data.dataset)
    frame = read_manifest(manifest_path(data_root(config.data.root), name))
    rows = frame[frame["split"].isin(["query", "gallery"])]
    for split in ("query", "gallery"):
        if not (rows["split"] == split).any():
            raise DatasetError(f"dataset {name!r} has no {split} images to evaluate on")
    return name, rows


def evaluate_model(
    model: ReidNet,
    config: RunConfig,
    *,
    dataset: str | None = None,
    device: torch.device | str = "cpu",
    flip: bool | None = None,
    ap_mode: str | None = None,
    rerank: bool | None = None,
    progress: bool = True,
    epoch: int | None = None,
) -> EvaluationReport:
    """Embed the query and gallery of a prepared dataset with `model` and score the ranking.

    Options left as None come from `config.eval`; `epoch` (the checkpoint's completed epochs)
    decides, with the rest of `paper_reference`, whether the published row is shown.
    Distances are cosine (1 - inner product of unit-length embeddings), the exact index's
    similarity. `rerank` ranks by k-reciprocal re-ranked distances instead (k1=20, k2=6,
    lambda=0.3), which, as in the authors' code, start from euclidean distances between the
    embeddings: for unit-length vectors these order neighbours as the cosine does, but the
    weights and the lambda term use their values.
    """
    evaluation = config.eval
    flip = evaluation.flip if flip is None else flip
    ap_mode = ap_mode or evaluation.ap_mode
    rerank = evaluation.rerank if rerank is None else rerank
    name, rows = query_gallery(config, dataset)
    if rerank and len(rows) < RERANK_K1 + 1:
        raise DatasetError(
            f"re-ranking needs at least {RERANK_K1 + 1} query and gallery images (k1 = "
            f"{RERANK_K1}); dataset {name!r} has {len(rows)}; evaluate it without --rerank "
            "(eval.rerank=false)"
        )
    num_pairs = int((rows["split"] == "query").sum()) * int((rows["split"] == "gallery").sum())
    if rerank and num_pairs > RERANK_MAX_PAIRS:
        raise DatasetError(
            f"re-ranking needs the whole query x gallery distance matrix, {num_pairs:,} pairs "
            f"for dataset {name!r} ({4 * num_pairs / 2**30:.1f} GiB); reidkit re-ranks up to "
            f"{RERANK_MAX_PAIRS:,}: evaluate it without --rerank (eval.rerank=false)"
        )
    seconds: dict[str, float] = {}
    features = {}
    for split in ("query", "gallery"):
        start = time.perf_counter()
        loader = build_loader(
            rows,
            split,
            config.data,
            batch_size=evaluation.batch_size,
            train=False,
            pin_memory=torch.device(device).type == "cuda",
        )
        features[split] = extract_features(
            model,
            loader,
            feature=evaluation.feature,
            flip=flip,
            device=device,
            progress=progress,
            description=f"extract {split}",
        )
        seconds[f"extract_{split}"] = time.perf_counter() - start
    query, gallery = (rows[rows["split"] == s] for s in ("query", "gallery"))
    start = time.perf_counter()
    ids = (
        query["pid"].to_numpy(np.int64),
        gallery["pid"].to_numpy(np.int64),
        query["camid"].to_numpy(np.int64),
        gallery["camid"].to_numpy(np.int64),
    )
    max_rank = min(evaluation.max_rank, len(gallery))
    if rerank:
        distances = k_reciprocal_rerank_features(
            features["query"], features["gallery"], RERANK_K1, RERANK_K2, RERANK_LAMBDA
        )
        metrics = cmc_map(distances, *ids, max_rank=max_rank, ap_mode=ap_mode)
    else:
        # A chunk of queries at a time: memory is bounded by a chunk, not queries x gallery.
        metrics = cmc_map_from_features(
            features["query"],
            features["gallery"],
            *ids,
            max_rank=max_rank,
            ap_mode=ap_mode,
            metric="cosine",
            progress=progress,
        )
    seconds["rank"] = time.perf_counter() - start
    folder = data_root(config.data.root) / name
    reference = paper_reference(config, folder, epoch=epoch, rerank=rerank)
    return EvaluationReport(
        dataset=name,
        preset=config.name,
        metrics=metrics,
        num_query=len(query),
        num_gallery=len(gallery),
        feature=evaluation.feature,
        flip=flip,
        rerank=rerank,
        paper=reference.row,
        paper_note=reference.note,
        seconds=seconds,
        camera_rule=has_camera_ids(folder),
        chance_rank1=chance_rank1(*ids, ap_mode=ap_mode),
        query_ids=int(query["pid"].nunique()),
        gallery_ids=int(gallery["pid"].nunique()),
        manifest=str((folder / MANIFEST_NAME).resolve()),
        manifest_sha256=manifest_sha256(folder / MANIFEST_NAME),
    )


def _concatenate(parts: list[MatchRanks]) -> MatchRanks:
    """One MatchRanks from those of consecutive chunks of queries."""
    counts = np.concatenate([part.counts for part in parts]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    ranks = np.concatenate([part.ranks for part in parts]).astype(np.int64)
    return MatchRanks(ranks=ranks, counts=counts, offsets=offsets)


def evaluate_gallery(
    model: ReidNet,
    config: RunConfig,
    gallery: Gallery,
    *,
    checkpoint: Path,
    dataset: str | None = None,
    device: torch.device | str = "cpu",
    flip: bool | None = None,
    ap_mode: str | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Score the ranking of a gallery where it lives (Milvus, or an index folder): only the
    dataset's queries are embedded, each one ranks the whole gallery through its search, and
    the protocol of `cmc_map` reads the ranked lists.

    The gallery's recorded checkpoint digest, feature kind and flip must be this model's (one
    line otherwise). With an exact index (flat) the numbers are those of `evaluate_model`.
    """
    evaluation = config.eval
    flip = bool(gallery.info.get("flip")) if flip is None else flip
    ap_mode = ap_mode or evaluation.ap_mode
    ours = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": checkpoint_digest(checkpoint),
        "feature_kind": evaluation.feature,
        "flip": flip,
    }
    check_model(gallery.info, ours, gallery.name)
    name, rows = query_gallery(config, dataset)
    query = rows[rows["split"] == "query"]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loader = build_loader(
        rows,
        "query",
        config.data,
        batch_size=evaluation.batch_size,
        train=False,
        pin_memory=torch.device(device).type == "cuda",
    )
    q_feats = extract_features(
        model, loader, feature=evaluation.feature, flip=flip, device=device, progress=progress,
        description="extract query",
    )  # fmt: skip
    seconds["extract_query"] = time.perf_counter() - start
    start = time.perf_counter()
    num_g = gallery.ntotal
    g_meta = gallery.rows_meta(np.arange(num_g))
    ids = (
        query["pid"].to_numpy(np.int64),
        g_meta["pid"].to_numpy(np.int64),
        query["camid"].to_numpy(np.int64),
        g_meta["camid"].to_numpy(np.int64),
    )
    # Whole rankings, a chunk of queries at a time: chunk x gallery distances in memory.
    chunk = max(1, min(len(q_feats), 2**24 // max(num_g, 1)))
    parts = []
    for first in range(0, len(q_feats), chunk):
        last = min(first + chunk, len(q_feats))
        scores, found = gallery.search(q_feats[first:last], num_g)
        distances = np.full((last - first, num_g), np.inf)  # a row the index missed ranks last
        taken = found >= 0
        rows_of = np.nonzero(taken)[0]
        distances[rows_of, found[taken]] = 1.0 - scores[taken].astype(np.float64)
        parts.append(match_ranks(distances, ids[0][first:last], ids[1], ids[2][first:last], ids[3]))
    metrics = metrics_from_ranks(
        _concatenate(parts), max_rank=min(evaluation.max_rank, num_g), ap_mode=ap_mode
    )
    seconds["rank"] = time.perf_counter() - start
    return EvaluationReport(
        dataset=name,
        preset=config.name,
        metrics=metrics,
        num_query=len(query),
        num_gallery=num_g,
        feature=evaluation.feature,
        flip=flip,
        rerank=False,
        # a row measured with another recipe is an anchor, never printed as this run's row
        paper=_same_recipe(config.paper.get(dataset_folder(name))),
        seconds=seconds,
        camera_rule=has_camera_ids(data_root(config.data.root) / name),
        chance_rank1=chance_rank1(*ids, ap_mode=ap_mode),
        query_ids=int(query["pid"].nunique()),
        gallery_ids=int(g_meta["pid"].nunique()),
        gallery=gallery.name,
    )


def run_evaluation(
    checkpoint: Path,
    dataset: str | None = None,
    *,
    root: Path | None = None,
    flip: bool | None = None,
    ap_mode: str | None = None,
    rerank: bool | None = None,
    feature: str | None = None,
    gallery: str | Path | None = None,
    collection: str | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """`reidkit evaluate`: load a checkpoint and evaluate it on a prepared dataset.

    With `gallery` (a `milvus:...` address, with `collection`, or an index folder), the
    gallery is the one `extract` stored there, ranked by its own search (`evaluate_gallery`).
    """
    if gallery is not None and rerank:
        raise DatasetError(
            "--rerank needs every gallery feature in memory, which --gallery does not load; "
            "evaluate without --gallery to re-rank"
        )
    model, state = load_model(checkpoint)
    config = state.config
    root = checkpoint_data_root(root, config.data.root)
    config = replace(config, data=replace(config.data, root=str(root)))
    if feature is not None:
        config = replace(config, eval=replace(config.eval, feature=feature))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    resolved = Path(checkpoint).expanduser().resolve()
    if gallery is not None:
        stored = open_gallery(gallery, collection)
        try:
            report = evaluate_gallery(
                model, config, stored, checkpoint=resolved, dataset=dataset, device=device,
                flip=flip, ap_mode=ap_mode, progress=progress,
            )  # fmt: skip
        finally:
            close = getattr(stored, "close", None)
            if close is not None:
                close()
        return replace(report, checkpoint=str(resolved))
    report = evaluate_model(
        model,
        config,
        dataset=dataset,
        device=device,
        flip=flip,
        ap_mode=ap_mode,
        rerank=rerank,
        progress=progress,
        epoch=state.epoch,
    )
    return replace(report, checkpoint=str(resolved))


def evaluated_manifest(config: RunConfig, root: Path | None = None) -> Path:
    """The manifest `run_evaluation` reads for a checkpoint with `config` on its own dataset."""
    root = checkpoint_data_root(root, config.data.root)
    return root / dataset_folder(config.data.dataset) / MANIFEST_NAME
