"""Extraction in shards: the image list cut into contiguous blocks, each `torchrun` rank embeds
its own run of blocks and writes each one atomically, rank 0 merges them in order.

A shard is a file `features-START-STOP.npy` (rows START..STOP-1 of the image list, float32) in
a shard folder whose `shards.json` ties it to one extraction: the checkpoint's SHA-256, the
feature kind and flip, and a digest of the ordered image list. An interrupted extraction run
again finds the shards it finished and embeds only the rest, with any number of processes; a
folder of another extraction is refused, never overwritten. Rank 0 removes the folder (only
files of these names) once the gallery is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from reidkit.config import DataConfig
from reidkit.data.loading import build_loader
from reidkit.engine.distributed import Distributed
from reidkit.engine.extract import FeatureKind, extract_features
from reidkit.errors import ReidkitError
from reidkit.models.net import ReidNet
from reidkit.outputs import atomic_write, remove_stale_temporaries, write_text
from reidkit.terminal import draws_bars

# At most this many images per shard: what a kill can cost, and rank 0's memory per read
# while it merges (4,096 PCB `g` features are 200 MB).
SHARD_SIZE = 4096
RUN_FILE = "shards.json"
SHARDS_FORMAT = "reidkit-shards"
_SHARD_NAME = re.compile(r"^features-(\d{12})-(\d{12})\.npy$")


class ShardError(ReidkitError):
    """A shard folder that belongs to another extraction, or a shard that does not load."""


@dataclass(frozen=True)
class ShardRun:
    """What ties shards to one extraction: same weights, same feature, same images in order."""

    checkpoint_sha256: str
    feature_kind: str
    flip: bool
    images_sha256: str
    num_images: int


def image_list_digest(paths: Sequence[str]) -> str:
    """SHA-256 of the ordered image paths (a reordered or changed list is another run)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def shard_bounds(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) blocks of at most `shard_size` images covering the list."""
    return [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]


def rank_share(bounds: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """Rank `rank`'s contiguous run of blocks: blocks r*B/W .. (r+1)*B/W - 1."""
    count = len(bounds)
    return bounds[rank * count // world_size : (rank + 1) * count // world_size]


def shard_name(start: int, stop: int) -> str:
    return f"features-{start:012d}-{stop:012d}.npy"


class ShardFolder:
    """A folder of one extraction's shards (see the module docstring)."""

    def __init__(self, folder: Path, run: ShardRun, shard_size: int) -> None:
        self.folder, self.run, self.shard_size = Path(folder), run, shard_size

    @classmethod
    def prepare(cls, folder: Path, run: ShardRun, shard_size: int) -> ShardFolder:
        """Open the folder of this extraction (its shard size wins), or start a new one.

        Refuses a folder of another extraction, and a folder of other files, in one line.
        """
        folder = Path(folder)
        record = folder / RUN_FILE
        if folder.exists() and not folder.is_dir():
            raise ShardError(f"--shards {folder} is a file; give a folder for the feature shards")
        if record.is_file():
            stored = _read_record(record)
            theirs = ShardRun(**{k: stored.get(k) for k in asdict(run)})
            if theirs != run:
                raise ShardError(
                    f"shard folder {folder} holds shards of another extraction ("
                    f"{_difference(theirs, run)}); finish that one, remove the folder, or give "
                    "--shards another folder"
                )
            remove_stale_temporaries(folder)  # of a writer killed mid-shard
            return cls(folder, run, int(stored["shard_size"]))
        if folder.is_dir() and any(folder.iterdir()):
            raise ShardError(
                f"--shards {folder} is a folder of other files (no {RUN_FILE}); give a new or "
                "empty folder for the feature shards"
            )
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"format": SHARDS_FORMAT, **asdict(run), "shard_size": shard_size}
        write_text(record, json.dumps(payload, indent=2) + "\n")
        return cls(folder, run, shard_size)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(self.run.num_images, self.shard_size)

    def finished(self) -> list[tuple[int, int]]:
        """The blocks of this extraction whose shard file is in place."""
        present = set()
        for entry in self.folder.iterdir():
            match = _SHARD_NAME.match(entry.name)
            if match:
                present.add((int(match[1]), int(match[2])))
        return [block for block in self.bounds if block in present]

    def write(self, start: int, stop: int, features: np.ndarray) -> None:
        with atomic_write(self.folder / shard_name(start, stop)) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, np.ascontiguousarray(features, np.float32), allow_pickle=False)

    def read(self, start: int, stop: int) -> np.ndarray:
        path = self.folder / shard_name(start, stop)
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ShardError(
                f"shard {path} does not load ({err}); remove that file and run the same command "
                "again to embed its images anew"
            ) from None
        if features.dtype != np.float32 or features.ndim != 2 or len(features) != stop - start:
            raise ShardError(
                f"shard {path} holds {features.dtype} {features.shape}, not {stop - start} rows "
                "of float32; remove that file and run the same command again"
            )
        return features

    def remove(self) -> None:
        """Delete this extraction's files (shards and shards.json), then the folder if empty."""
        for entry in self.folder.iterdir():
            if _SHARD_NAME.match(entry.name):
                entry.unlink()
        (self.folder / RUN_FILE).unlink(missing_ok=True)
        if not any(self.folder.iterdir()):
            self.folder.rmdir()


def _read_record(record: Path) -> dict[str, Any]:
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{record} is unreadable ({err}); remove the shard folder") from None
    if not isinstance(stored, dict) or stored.get("format") != SHARDS_FORMAT:
        raise ShardError(f"{record} is not a reidkit shard record; give --shards another folder")
    if not isinstance(stored.get("shard_size"), int) or stored["shard_size"] < 1:
        raise ShardError(f"{record}: shard_size must be a positive integer; remove the folder")
    return stored


def _difference(theirs: ShardRun, ours: ShardRun) -> str:
    if theirs.num_images != ours.num_images:
        return f"{theirs.num_images:,} images, not {ours.num_images:,}"
    words = {
        "checkpoint_sha256": "another checkpoint",
        "feature_kind": f"feature {theirs.feature_kind}, not {ours.feature_kind}",
        "flip": f"flip {'on' if theirs.flip else 'off'}, not {'on' if ours.flip else 'off'}",
        "images_sha256": "another image list",
    }
    return "; ".join(words[key] for key in words if getattr(theirs, key) != getattr(ours, key))


@dataclass(frozen=True)
class ShardedFeatures:
    """Rank 0's view of a finished sharded extraction."""

    folder: ShardFolder
    resumed: int  # shards already finished when this run began
    total: int  # shards in all
    embedded: int  # images this run embedded, over all ranks
    seconds: float  # wall time of the embedding, first batch to last shard written
    world_size: int

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, features) of every shard, in image order."""
        for start, stop in self.folder.bounds:
            yield start, stop, self.folder.read(start, stop)

    def features(self) -> np.ndarray:
        """All features in image order, (N, D) float32."""
        return np.concatenate([features for _, _, features in self.blocks()])


class _ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} images/s" if speed else "- images/s")


def agree(place: Distributed, step: Callable[[], Any]) -> Any:
    """Rank 0 runs `step` (a check, or a set-up only one process may do); every rank gets its
    result, or raises its error, so a refusal stops all ranks with the same one line."""
    outcome: list[Any] = [None, None]
    error: ReidkitError | None = None
    if place.is_main:
        try:
            outcome = [step(), None]
        except ReidkitError as err:
            error, outcome = err, [None, str(err)]
    if place.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise ReidkitError(outcome[1])
    return outcome[0]


def extract_in_shards(
    model: ReidNet,
    rows: pd.DataFrame,
    data: DataConfig,
    *,
    run: ShardRun,
    folder: Path,
    place: Distributed,
    device: torch.device,
    batch_size: int,
    feature: FeatureKind,
    flip: bool,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
) -> ShardedFeatures | None:
    """Embed `rows` (split "gallery") into shards, this rank its share; rank 0 gets the result.

    Every rank of the job calls it. A new folder's shards hold at most `shard_size` images
    and at most ceil(N / world size), so every rank has work; a resumed folder keeps its
    own size, whatever the number of processes now. Progress on rank 0 counts the images
    of all ranks (one all-reduce per batch, the same number on every rank).
    """
    num_images = len(rows)
    size = max(1, min(shard_size, math.ceil(num_images / place.world_size)))

    def open_folder() -> tuple[int, list[tuple[int, int]]]:
        shards = ShardFolder.prepare(folder, run, size)
        return shards.shard_size, shards.finished()

    size, finished = agree(place, open_folder)
    shards = ShardFolder(folder, run, size)
    done = set(map(tuple, finished))
    mine = rank_share(shards.bounds, place.rank, place.world_size)
    pending = [block for block in mine if block not in done]
    batches = sum(math.ceil((stop - start) / batch_size) for start, stop in pending)
    images = sum(stop - start for start, stop in pending)
    counts = torch.tensor([batches, images], dtype=torch.int64, device=_collective(device))
    if place.world_size > 1:
        steps = counts[:1].clone()
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        batches = int(steps.item())
    total_images = int(counts[1].item())

    columns = (
        TextColumn(f"embed {num_images:,} images, {place.world_size} process(es)"),
        BarColumn(),
        MofNCompleteColumn(),
        _ImagesPerSecond(),
        TimeRemainingColumn(),
    )
    shown = place.is_main and draws_bars(progress)
    taken = 0
    start_time = time.perf_counter()
    try:
        with Progress(*columns, disable=not shown, transient=True) as bar:
            task = bar.add_task("embed", total=total_images)

            def tick(count: int) -> None:
                nonlocal taken
                taken += 1
                value = torch.tensor([count], dtype=torch.int64, device=_collective(device))
                if place.world_size > 1:
                    dist.all_reduce(value)
                bar.update(task, advance=int(value.item()))

            for start, stop in pending:
                loader = build_loader(
                    rows.iloc[start:stop],
                    "gallery",
                    data,
                    batch_size=batch_size,
                    train=False,
                    pin_memory=device.type == "cuda",
                )
                features = extract_features(
                    model, loader, feature=feature, flip=flip, device=device, progress=False,
                    on_batch=tick,
                )  # fmt: skip
                shards.write(start, stop, features)
            while taken < batches:  # ranks with less work still join every all-reduce
                tick(0)
    except BaseException:
        if place.world_size == 1 and not shards.finished():
            shards.remove()  # interrupted before any shard was done: nothing to resume from
        raise
    if place.world_size > 1:
        dist.barrier()
    seconds = time.perf_counter() - start_time
    if not place.is_main:
        return None
    return ShardedFeatures(
        folder=shards,
        resumed=len(done),
        total=len(shards.bounds),
        embedded=total_images,
        seconds=seconds,
        world_size=place.world_size,
    )


def _collective(device: torch.device) -> torch.device:
    """Where tensors for collectives live: NCCL needs the GPU, gloo the CPU."""
    return device if device.type == "cuda" and dist.is_initialized() else torch.device("cpu")
