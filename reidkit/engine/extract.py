"""Batched embedding extraction: PCB's part features, each part L2-normalised, concatenated."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from reidkit.errors import NumericalError
from reidkit.models.net import NetOutput, ReidNet
from reidkit.terminal import draws_bars

FeatureKind = Literal["g", "h"]


def embed(output: NetOutput, feature: FeatureKind) -> torch.Tensor:
    """(B, P, C) part vectors of one kind -> (B, P*C): each part unit-length, then the whole.

    `g` are the pooled 2048-d stripes PCB tests with; `h` the 256-d reduced ones. The final
    normalisation only rescales (every concatenation has norm sqrt(P)), so inner products are
    cosines in [-1, 1] and rankings are unchanged.
    """
    parts = output.part_features if feature == "g" else output.reduced_features  # (B, P, C)
    parts = F.normalize(parts.float(), dim=-1)  # (B, P, C)
    return F.normalize(parts.flatten(1), dim=-1)  # (B, P*C)


def embed_images(
    model: ReidNet, images: torch.Tensor, *, feature: FeatureKind = "g", flip: bool = False
) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> the test feature (B, D), float32, rows of unit length.

    With `flip`, each image's part vectors are averaged with its mirror image's before
    normalising. The one embedding that `extract`, `search`, the Python API and the ONNX
    export all use.
    """
    output = model(images)
    if flip:
        mirrored = model(images.flip(-1))
        output = NetOutput(
            part_features=output.part_features + mirrored.part_features,
            reduced_features=output.reduced_features + mirrored.reduced_features,
            part_logits=output.part_logits,
            aux_logits=output.aux_logits,
        )
    return embed(output, feature)


@torch.inference_mode()
def extract_features(
    model: ReidNet,
    loader: Iterable,
    *,
    feature: FeatureKind = "g",
    flip: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "extract",
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed every image a loader yields, in order: (N, P*C) float32, rows of unit length.

    The loader yields `(images, ...)` batches of normalised (B, 3, H, W) tensors. With `flip`,
    each image's part vectors are averaged with those of its mirror image before normalising.
    A CSALR landmark solve that fails raises `NumericalError`, which says how to retrain.
    `on_batch(images)` is called after each batch (sharded extraction counts all ranks).
    """
    device = torch.device(device)
    model.eval()
    chunks: list[np.ndarray] = []
    total = len(loader) if hasattr(loader, "__len__") else None
    columns = (
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not draws_bars(progress), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for batch in loader:
            images = batch[0].to(device, non_blocking=True)
            try:
                features = embed_images(model, images, feature=feature, flip=flip)
            except torch.linalg.LinAlgError as err:
                raise _singular_landmarks(err) from None
            check_finite(features, _batch_names(loader, batch))
            chunks.append(features.cpu().numpy())
            bar.update(task, advance=1)
            if on_batch is not None:
                on_batch(len(images))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def check_finite(features: torch.Tensor, names: list[str] | None = None) -> None:
    """Refuse features with a NaN or infinite value: they would rank anywhere, silently.

    Finite weights can still overflow (a damaged or diverged model); `names` are the images
    of the rows, to name the first bad one.
    """
    bad = ~torch.isfinite(features).all(dim=1)
    if not bool(bad.any()):
        return
    rows = torch.nonzero(bad).flatten().tolist()
    first = f"image {names[rows[0]]}" if names else f"image {rows[0] + 1} of the batch"
    others = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
    raise NumericalError(
        f"the model gives NaN or infinite features for {first}{others}; its weights overflow "
        "or are damaged: use an intact checkpoint (one from before the run diverged) or train "
        "again"
    )


def _batch_names(loader: Iterable, batch) -> list[str] | None:
    """The image paths of a loader's batch, when its dataset knows them (ReidDataset)."""
    paths = getattr(getattr(loader, "dataset", None), "paths", None)
    if paths is None or len(batch) < 4:
        return None
    return [str(paths[int(i)]) for i in batch[3]]


def _singular_landmarks(err: Exception) -> NumericalError:
    # c is part of the trained model (its config is stored in the checkpoint), so it cannot
    # be changed at evaluation time: only a model trained with c = 2 avoids this.
    return NumericalError(
        f"a CSALR landmark matrix became singular while embedding images "
        f"({str(err).splitlines()[0]}); this model cannot embed them: attention.landmark_weight "
        "is stored in its checkpoint, so train it again with --set attention.landmark_weight=2"
    )
