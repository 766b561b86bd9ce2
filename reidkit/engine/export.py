"""ONNX export: images in, the checkpoint's unit-length test feature out, checked by onnxruntime.

CSALR's landmark solve has no ONNX operator; the export runs it as Newton-Schulz steps
(:func:`reidkit.models.attention.solve_landmarks`), as many as make it exact to float32 for
the landmark matrices the model meets (:func:`solve_steps`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from reidkit import __version__
from reidkit.config import RunConfig, data_root
from reidkit.data.datasets import dataset_folder, manifest_path
from reidkit.data.loading import IMAGENET_MEAN, IMAGENET_STD, build_loader, read_manifest
from reidkit.engine.checkpoint import load_model
from reidkit.engine.extract import embed_images
from reidkit.errors import ConfigError, NumericalError, ReidkitError
from reidkit.models.attention import CSALR, newton_schulz_iterations
from reidkit.models.net import ReidNet
from reidkit.outputs import MARK, MARK_KEY, check_output_file, output_file

# How many of the checkpoint's own query images check the export when no --check-images
# folder is given: enough to meet the landmark matrices of typical inputs, few enough to be
# quick on a CPU.
CHECK_IMAGES = 64
# A model exported with the paper's c = 1 is exact for inputs whose landmark self-weights stay
# above the smallest the check images reach divided by this: a margin for unseen inputs.
SELF_WEIGHT_MARGIN = 10.0
MAX_SOLVE_STEPS = 40  # 80 products of m x m per module and group: beyond, refuse
MIN_COSINE = 0.9999  # per image, onnxruntime's feature against PyTorch's


class ExportMissingError(ReidkitError, ImportError):
    """onnx / onnxruntime are not installed."""


@dataclass(frozen=True)
class ExportReport:
    """What `export_onnx` wrote and how it checked it."""

    path: Path
    seconds: float
    solve_steps: int | None  # Newton-Schulz steps of CSALR's solve; None without CSALR
    min_self_weight: float | None  # the smallest landmark self-weight the check images met
    checked_images: int
    min_cosine: float | None  # onnxruntime vs PyTorch, the worst image
    metadata: dict[str, str]


class EmbeddingNet(nn.Module):
    """A ReidNet with its feature kind and flip: (N, 3, H, W) -> (N, D) unit-length features."""

    def __init__(self, net: ReidNet, feature: str, flip: bool) -> None:
        super().__init__()
        self.net, self.feature, self.flip = net, feature, flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embed_images(self.net, images, feature=self.feature, flip=self.flip)


EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # reidkit[export]


def import_onnx():
    """(onnx, onnxruntime), or one line naming the packages missing and how to install all
    three (torch's exporter needs onnxscript too)."""
    import importlib

    modules, missing = {}, []
    for name in EXPORT_PACKAGES:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        # `pip install 'reidkit[export]'` would ask the package index for another project of
        # that name: name the packages, for the interpreter that runs reidkit
        raise ExportMissingError(
            f"ONNX export needs {', '.join(EXPORT_PACKAGES[:-1])} and {EXPORT_PACKAGES[-1]} "
            f"({', '.join(missing)} missing): {shlex.quote(sys.executable)} -m pip install "
            f'{" ".join(EXPORT_PACKAGES)} (from a reidkit checkout: pip install -e ".[export]")'
        )
    return modules["onnx"], modules["onnxruntime"]


def check_batches(config: RunConfig, images: Path | None) -> tuple[list[torch.Tensor], str]:
    """Normalised image batches to check the export with, and where they came from."""
    if images is not None:
        from reidkit.engine.search import folder_images

        rows, source = folder_images(images), str(images)
    else:
        path = manifest_path(data_root(config.data.root), config.data.dataset)
        if not path.is_file():
            return [], "no images"
        frame = read_manifest(path)
        rows = frame[frame["split"] == "query"].head(CHECK_IMAGES)
        source = f"{dataset_folder(config.data.dataset)} query images"
        if rows.empty:
            return [], "no images"
    rows = pd.DataFrame(rows).head(CHECK_IMAGES).assign(split="query")
    loader = build_loader(rows, "query", config.data, batch_size=16, train=False)
    return [batch[0] for batch in loader], f"{len(rows)} {source}"


@torch.no_grad()
def smallest_self_weight(net: ReidNet, batches: list[torch.Tensor]) -> float:
    """The smallest softmax weight a landmark puts on itself, over CSALR modules and images."""
    seen: list[float] = []

    def record(module: CSALR, inputs: tuple[torch.Tensor]) -> None:
        q, k = module.queries_keys(inputs[0].float())
        margin = module._smallest_margin(q, k)  # c - 1 + 2 min s_kk
        seen.append((margin.item() - module.landmark_weight + 1) / 2)

    modules = [m for m in net.modules() if isinstance(m, CSALR)]
    handles = [m.register_forward_pre_hook(record) for m in modules]
    try:
        for images in batches:
            net(images)
    finally:
        for handle in handles:
            handle.remove()
    return min(seen)


def solve_steps(net: ReidNet, batches: list[torch.Tensor]) -> tuple[int | None, float | None]:
    """Newton-Schulz steps for the model's CSALR solves, and the self-weight they assume.

    With an indicator weight c >= 2 the step count holds for any input (5 at c = 2). The
    paper's c = 1 converges at a rate set by the smallest self-weight s of a landmark: the
    count is chosen for the smallest s the check images reach, over SELF_WEIGHT_MARGIN.
    """
    modules = [m for m in net.modules() if isinstance(m, CSALR)]
    if not modules:
        return None, None
    weight = min(m.landmark_weight for m in modules)
    if weight > 1:
        return newton_schulz_iterations(weight), None
    if not batches:
        raise ConfigError(
            "this CSALR model has the paper's landmark weight 1, whose ONNX solve needs images "
            "it meets to choose its step count; give --check-images FOLDER (or prepare the "
            "checkpoint's dataset)"
        )
    fix = "a model trained with --set attention.landmark_weight=2 exports with 5 steps"
    try:
        floor = smallest_self_weight(net, batches)
    except torch.linalg.LinAlgError:
        raise ConfigError(
            "CSALR's landmark matrices are singular on the check images, so no exact ONNX "
            f"solve exists (PyTorch's own LU fails on them); {fix}"
        ) from None
    try:
        steps = newton_schulz_iterations(weight, floor / SELF_WEIGHT_MARGIN)
    except ValueError:
        steps = MAX_SOLVE_STEPS + 1
    if steps > MAX_SOLVE_STEPS:
        raise ConfigError(
            f"CSALR's landmark matrices on the check images are too close to singular for an "
            f"exact ONNX solve (a landmark puts {floor:.2g} of its attention on itself; more "
            f"than {MAX_SOLVE_STEPS} Newton-Schulz steps would be needed); {fix}"
        )
    return steps, floor


def export_onnx(
    checkpoint: Path, out: Path, *, check_images: Path | None = None, opset: int = 18
) -> ExportReport:
    """Write `out` (.onnx): dynamic batch of normalised images -> the checkpoint's test feature.

    The model's metadata records the input size, mean and std, feature kind, flip and
    reidkit's version. onnxruntime then embeds the check images (a folder, or the
    checkpoint's own query images) and each feature must match PyTorch's to a cosine of
    MIN_COSINE, and every feature must be finite; a model that fails is not kept. `out` may be
    new or an ONNX file reidkit wrote (its metadata says so), never the checkpoint itself.
    """
    onnx, onnxruntime = import_onnx()
    inputs = [("the checkpoint", checkpoint)]
    check_output_file("--out", out, "onnx", inputs=inputs)
    started = time.perf_counter()
    net, state = load_model(checkpoint)
    config = state.config
    batches, source = check_batches(config, check_images)
    steps, floor = solve_steps(net, batches)
    wrapper = EmbeddingNet(net, config.eval.feature, config.eval.flip).eval()
    # PyTorch's own features first: a model that overflows is refused in a second, before
    # torch's exporter spends its ~20 s tracing it
    _check_finite(wrapper, batches, out)
    example = torch.zeros(2, 3, config.data.height, config.data.width)
    metadata = {
        MARK_KEY: MARK,  # reidkit's own file: a later export may replace it
        "reidkit": __version__,
        "preset": config.name,
        "input": f"float32 N x 3 x {config.data.height} x {config.data.width}, RGB",
        "preprocessing": (
            f"resize to {config.data.height}x{config.data.width} (bilinear), scale to [0, 1], "
            f"subtract mean {list(IMAGENET_MEAN)}, divide by std {list(IMAGENET_STD)}"
        ),
        "output": "float32 N x D test features, unit length (inner product = cosine)",
        "feature": config.eval.feature,
        "flip": str(config.eval.flip).lower(),
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    if steps is not None:
        metadata["csalr_solve"] = f"{steps} Newton-Schulz steps" + (
            f", exact for landmark self-weights above {floor / SELF_WEIGHT_MARGIN:.3g}"
            if floor is not None
            else ""
        )
    out = Path(out)
    try:
        _set_solve_steps(net, steps)
        with output_file(out, "onnx", inputs=inputs) as temporary:
            with _quiet():
                program = torch.onnx.export(
                    wrapper,
                    (example,),
                    input_names=["images"],
                    output_names=["features"],
                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
            model = program.model_proto
            for key, value in metadata.items():
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.save(model, str(temporary))
            _set_solve_steps(net, None)  # PyTorch's own answer, by LU, to check against
            try:
                min_cosine = _check(onnxruntime, temporary, wrapper, batches)
            except NumericalError as err:
                raise NumericalError(f"{err}; nothing was written to {out}") from None
            if min_cosine is not None and min_cosine < MIN_COSINE:
                raise ReidkitError(
                    f"the exported model disagrees with PyTorch on {source} (worst cosine "
                    f"{min_cosine:.6f} < {MIN_COSINE}); nothing was written to {out}"
                )
    finally:
        _set_solve_steps(net, None)
    return ExportReport(
        path=out,
        seconds=time.perf_counter() - started,
        solve_steps=steps,
        min_self_weight=floor,
        checked_images=sum(len(b) for b in batches),
        min_cosine=min_cosine,
        metadata=metadata,
    )


def _set_solve_steps(net: nn.Module, steps: int | None) -> None:
    for module in net.modules():
        if isinstance(module, CSALR):
            module.solve_iterations = steps


def _non_finite(side: str) -> str:
    return (
        f"{side} gives NaN or infinite features for the check images, so the export cannot be "
        "checked; the model's weights overflow or are damaged: export an intact checkpoint"
    )


@torch.no_grad()
def _check_finite(wrapper: EmbeddingNet, batches, out: Path) -> None:
    for images in batches:
        if not torch.isfinite(wrapper(images)).all():
            raise NumericalError(f"{_non_finite('PyTorch')}; nothing was written to {out}")


@torch.no_grad()
def _check(onnxruntime, path: Path, wrapper: EmbeddingNet, batches) -> float | None:
    """The smallest per-image cosine between onnxruntime's and PyTorch's features."""
    if not batches:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 1.0
    for images in batches:
        (got,) = session.run(None, {"images": images.numpy()})
        want = wrapper(images).numpy()
        # min() skips a NaN cosine (every comparison with NaN is false): check explicitly
        for side, features in (("onnxruntime", got), ("PyTorch", want)):
            if not np.isfinite(features).all():
                raise NumericalError(_non_finite(side))
        worst = min(worst, float(np.min(np.sum(got * want, axis=1))))
    return worst


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and warns about torchvision: neither is reidkit's news."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata an exported model carries (for `reidkit export` to print, and users)."""
    onnx, _ = import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}
