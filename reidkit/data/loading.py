"""Loading prepared datasets: transforms, the identity sampler and DataLoaders (no torchvision).

`manifest_path` and `read_manifest` live in `datasets.py`, so that `prepare` runs without
importing torch; they are re-exported here as the loader's entry points.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from reidkit.config import DataConfig
from reidkit.data.datasets import SPLITS, manifest_path, read_manifest
from reidkit.errors import ConfigError, DatasetError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IdentitySampler",
    "ReidDataset",
    "ReidLoader",
    "ReidTransform",
    "build_loader",
    "build_transform",
    "epoch_seed",
    "manifest_path",
    "read_manifest",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Random erasing (Zhong et al., AAAI 2020), as published and as the strong baseline (Luo et
# al. 2019) uses it: erased area uniform in 2-40% of the image, aspect ratio h/w uniform in
# [0.3, 1/0.3] (not log-uniform: taller boxes are the more frequent, as in their code), up to
# 100 draws for a box that fits; filled with the ImageNet mean colour (0 after normalising).
_ERASE_AREA = (0.02, 0.4)
_ERASE_RATIO = (0.3, 1 / 0.3)
_ERASE_TRIES = 100


class ReidTransform:
    """PIL image -> normalised (3, H, W) float32 tensor, with optional training augmentation.

    Order: resize (bilinear) -> horizontal flip -> pad-and-crop -> normalise -> random erasing.
    Pixels become a uint8 array once; the flip and the crop are views of it, and one float
    pass normalises. The pixel work is numpy, not torch: per-image torch ops go through
    torch's intra-op thread pool, which costs ~100x on a busy 2-core machine when the loader
    runs in the main process. The random draws come from torch's RNG, which DataLoader seeds
    per worker from the loader's generator.
    """

    def __init__(
        self,
        height: int,
        width: int,
        *,
        train: bool,
        flip: float = 0.5,
        random_erasing: float = 0.0,
        pad_crop: int = 0,
    ) -> None:
        for key, value in (("data.flip", flip), ("data.random_erasing", random_erasing)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} = {value} must be a probability in [0, 1]")
        if pad_crop < 0:
            raise ConfigError(f"data.pad_crop = {pad_crop} must be 0 (off) or a pixel count")
        if height < 1 or width < 1:
            raise ConfigError(f"image size {height}x{width} must be positive")
        self.height, self.width, self.train = height, width, train
        self.flip = flip if train else 0.0
        self.random_erasing = random_erasing if train else 0.0
        self.pad_crop = pad_crop if train else 0
        # normalising uint8 values directly: (x - 255 * mean) / (255 * std)
        self._mean = (np.array(IMAGENET_MEAN, np.float32) * 255).reshape(3, 1, 1)
        self._inv_std = (1 / (np.array(IMAGENET_STD, np.float32) * 255)).reshape(3, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image)  # (H, W, 3) uint8, read-only: only views are taken below
        if self.flip > 0 and _uniform() < self.flip:
            pixels = pixels[:, ::-1]
        if self.pad_crop > 0:
            pixels = self._pad_crop(pixels)
        out = pixels.transpose(2, 0, 1).astype(np.float32, order="C")  # (3, H, W), a copy
        out -= self._mean
        out *= self._inv_std
        if self.random_erasing > 0 and _uniform() < self.random_erasing:
            self._erase(out)
        return torch.from_numpy(out)

    def _pad_crop(self, pixels: np.ndarray) -> np.ndarray:
        """Zero-pad (black, as torchvision's Pad) by pad_crop pixels, crop a random H x W."""
        pad = self.pad_crop
        padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)))  # (H + 2p, W + 2p, 3)
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return padded[top : top + self.height, left : left + self.width]

    def _erase(self, image: np.ndarray) -> None:
        """Fill a random rectangle with 0, the mean colour after normalisation."""
        _, height, width = image.shape
        for _ in range(_ERASE_TRIES):
            draws = torch.rand(2).tolist()
            area = height * width * (_ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * draws[0])
            ratio = _ERASE_RATIO[0] + (_ERASE_RATIO[1] - _ERASE_RATIO[0]) * draws[1]  # h / w
            box_h = round(math.sqrt(area * ratio))
            box_w = round(math.sqrt(area / ratio))
            if 0 < box_h < height and 0 < box_w < width:
                top = int(torch.randint(0, height - box_h + 1, ()).item())
                left = int(torch.randint(0, width - box_w + 1, ()).item())
                image[:, top : top + box_h, left : left + box_w] = 0.0
                return


def _uniform() -> float:
    return torch.rand(()).item()


def build_transform(
    height: int,
    width: int,
    *,
    train: bool,
    flip: float = 0.5,
    random_erasing: float = 0.0,
    pad_crop: int = 0,
) -> ReidTransform:
    """The image transform; augmentation (flip, pad_crop, random_erasing) only when `train`."""
    return ReidTransform(
        height, width, train=train, flip=flip, random_erasing=random_erasing, pad_crop=pad_crop
    )


class ReidDataset(Dataset):
    """Rows of a manifest as `(image (3, H, W), label, camid, index)` samples.

    A train-only frame is relabelled: label = position of the pid in `pids` (sorted), so the
    classifier sees 0..num_ids-1. Query and gallery samples keep the raw pid as their label.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        transform: Callable[[Image.Image], Tensor],
        *,
        relabel: bool | None = None,  # default: when every row is from the train split
    ) -> None:
        if relabel is None:
            relabel = bool(len(frame)) and bool((frame["split"] == "train").all())
        self.transform = transform
        self.splits = tuple(s for s in SPLITS if (frame["split"] == s).any())
        # numpy arrays, not Python lists: worker processes read them without touching Python
        # object refcounts, so the forked copy-on-write pages stay shared
        self.paths = np.array(frame["path"].tolist(), dtype=str)
        raw_pids = frame["pid"].to_numpy(np.int64)
        self.pids = np.unique(raw_pids)  # sorted
        self.labels = np.searchsorted(self.pids, raw_pids) if relabel else raw_pids
        self.camids = frame["camid"].to_numpy(np.int64)

    @property
    def num_ids(self) -> int:
        return len(self.pids)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int, int]:
        path = str(self.paths[index])
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as err:  # PIL reports bad data with many exception types
            raise DatasetError(
                f"{path} is not a readable image ({err}); replace it, or run "
                "`reidkit prepare ... --check-images` to find every bad file"
            ) from None
        return self.transform(image), int(self.labels[index]), int(self.camids[index]), index


class IdentitySampler(Sampler[list[int]]):
    """P x K batches: P = batch_size // instances identities, K = instances images of each.

    Each epoch every identity's images are shuffled and cut into chunks of K (an identity with
    fewer than K images gives one chunk drawn with replacement); batches take one chunk from
    each of P distinct identities, favouring those with most chunks left, so an epoch visits
    nearly every image once. The order depends only on (seed, epoch): call `set_epoch` before
    each epoch. With `num_replicas` > 1, rank r takes batches r, r + R, r + 2R, ... of the same
    sequence: disjoint shares of equal length.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        instances: int,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if instances < 1 or batch_size % instances:
            raise ConfigError(
                f"train.batch_size = {batch_size} must be a multiple of data.instances = "
                f"{instances} for the identity sampler"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        labels = np.asarray(labels, dtype=np.int64)
        self.identities = batch_size // instances  # P
        self.instances = instances  # K
        order = np.argsort(labels, kind="stable")
        _, starts = np.unique(labels[order], return_index=True)
        self._groups = np.split(order, starts[1:])  # dataset indices of each identity
        if self.identities > len(self._groups):
            raise ConfigError(
                f"the identity sampler needs {self.identities} identities per batch "
                f"(train.batch_size / data.instances) but the data has {len(self._groups)}"
            )
        self.seed, self.epoch = seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        chunks = sum(max(1, len(g) // instances) for g in self._groups)
        self._total = chunks // self.identities  # batches over all replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._total // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        yield from batches[self.rank :: self.num_replicas][: len(self)]

    def _epoch_batches(self) -> list[list[int]]:
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch))
        k = self.instances
        chunks = []
        for group in self._groups:
            if len(group) < k:
                chunks.append([rng.choice(group, k, replace=True)])
            else:
                shuffled = rng.permutation(group)
                chunks.append([shuffled[i * k : (i + 1) * k] for i in range(len(group) // k)])
        left = np.array([len(c) for c in chunks])  # chunks not yet used, per identity
        batches = []
        for _ in range(self._total):
            available = np.flatnonzero(left)
            if len(available) >= self.identities:
                weights = left[available] / left[available].sum()
                chosen = rng.choice(available, self.identities, replace=False, p=weights)
            else:
                # the last batches: top up with identities whose chunks are spent, drawing K of
                # their images afresh, so every batch still has P distinct identities
                spent = np.flatnonzero(left == 0)
                extra = rng.choice(spent, self.identities - len(available), replace=False)
                chosen = np.concatenate([available, extra])
            batch = []
            for identity in chosen:
                if left[identity] > 0:
                    left[identity] -= 1
                    batch.extend(chunks[identity][left[identity]].tolist())
                else:
                    group = self._groups[identity]
                    batch.extend(rng.choice(group, k, replace=len(group) < k).tolist())
            batches.append(batch)
        return batches


class ReidLoader(DataLoader):
    """A DataLoader that re-raises a worker's DatasetError with its own one-line message.

    torch folds a worker's traceback into the message of the exception it re-raises; reidkit
    prints its errors as one line, so the original message (the traceback's last line) is kept.
    """

    def __iter__(self) -> Iterator:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DatasetError as err:
                raise DatasetError(_worker_message(str(err))) from None
            yield batch


def _worker_message(text: str) -> str:
    prefix = f"{DatasetError.__module__}.{DatasetError.__qualname__}: "
    last = text.rstrip().splitlines()[-1]
    if text.startswith("Caught ") and last.startswith(prefix):
        return last[len(prefix) :]
    return text


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 64-bit seed that depends on (seed, epoch, rank) alone; hashed, so seed 1 epoch 0 and
    seed 0 epoch 1 do not share a stream as `seed + epoch` would."""
    state = np.random.SeedSequence([seed % 2**64, epoch, rank]).generate_state(1, np.uint64)
    return int(state[0])


def split_dataset(
    frame: pd.DataFrame, split: str, config: DataConfig, *, train: bool
) -> ReidDataset:
    """One split of a manifest frame as a ReidDataset, augmented as `config` says when `train`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise DatasetError(f"the manifest has no {split} images")
    transform = build_transform(
        config.height,
        config.width,
        train=train,
        flip=config.flip,
        random_erasing=config.random_erasing,
        pad_crop=config.pad_crop,
    )
    return ReidDataset(rows, transform)


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS keeps one (taskset, a
    container's CPU set), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


_CAPS_SAID: set[tuple[int, int]] = set()  # (asked, cap) pairs already reported


def loader_workers(asked: int, *, announce: bool = True) -> int:
    """`data.workers`, capped at the cores this process may use.

    More worker processes than cores only compete for them (and PyTorch warns about it on
    every loader); the presets ask for 4, which a 2-core machine cannot run. The cap is said
    once per process, and only when it changes the value.
    """
    cap = usable_cores()
    if asked <= cap:
        return asked
    if announce and (asked, cap) not in _CAPS_SAID:
        _CAPS_SAID.add((asked, cap))
        Console(stderr=True).print(
            f"data.workers = {asked} capped at {cap}: this process may use {cap} CPU "
            f"core{'s' if cap != 1 else ''}",
            highlight=False,
            soft_wrap=True,
        )
    return cap


def build_loader(
    data: pd.DataFrame | ReidDataset,
    split: str,
    config: DataConfig,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> ReidLoader:
    """A DataLoader over one split of a manifest frame (or over a ready ReidDataset).

    Train loaders (`train=True`) augment as `config` says, draw batches with `config.sampler`
    ("random": uniform shuffle; "identity": IdentitySampler P x K) and drop the last incomplete
    batch; eval loaders keep the frame's order and every sample.

    Reproducibility: the shuffle order, the identity batches and the workers' augmentation seeds
    all come from a torch.Generator seeded with `epoch_seed(seed, epoch, rank)`, so build a new
    loader each epoch with that epoch's number (workers are not persistent, so they restart with
    the new seeds) and a resumed run replays the same epochs. With `config.workers = 0` the
    augmentation draws come from the main process's global torch RNG instead; seed it with
    `torch.manual_seed(epoch_seed(seed, epoch, rank))` before the epoch to get the same guarantee.
    `config.workers` is capped at the cores this process may use (`loader_workers`).
    """
    if isinstance(data, ReidDataset):
        if data.splits != (split,):
            raise ValueError(f"the dataset holds split(s) {data.splits}, not {split!r}")
        dataset = data
    else:
        dataset = split_dataset(data, split, config, train=train)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
    common = {
        "num_workers": loader_workers(config.workers, announce=rank == 0),
        "pin_memory": pin_memory,
        "generator": generator,  # seeds the workers: base seed + worker id
    }
    if not train:
        return ReidLoader(dataset, batch_size=batch_size, shuffle=False, **common)
    if config.sampler == "identity":
        batches = IdentitySampler(
            dataset.labels,
            batch_size,
            config.instances,
            seed,
            num_replicas=num_replicas,
            rank=rank,
        )
        batches.set_epoch(epoch)
        loader = ReidLoader(dataset, batch_sampler=batches, **common)
    else:
        if num_replicas > 1:
            sampler: Sampler[int] = DistributedSampler(
                dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True
            )
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=generator)
        loader = ReidLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common
        )
    if len(loader) == 0:
        raise DatasetError(
            f"the {split} split has {len(dataset):,} images, too few for one training batch of "
            f"{batch_size}{' per process' if num_replicas > 1 else ''}"
        )
    return loader
