"""ONNX export: onnxruntime's features against PyTorch's on real images, rankings, refusals."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from reidkit.data.loading import build_loader, manifest_path, read_manifest
from reidkit.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from reidkit.engine.export import MIN_COSINE, ExportMissingError, export_onnx, read_metadata
from reidkit.engine.extract import embed_images
from reidkit.engine.train import fit
from reidkit.errors import ConfigError

onnxruntime = pytest.importorskip("onnxruntime")

SUBSET = Path(
    os.environ.get("REIDKIT_CUHK03_SUBSET")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "cuhk03-subset"
)
needs_subset = pytest.mark.skipif(not SUBSET.is_dir(), reason=f"no shared images at {SUBSET}")


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> Path:
    """A folder of links to 24 real query crops of the shared subset (never copies)."""
    if not SUBSET.is_dir():
        pytest.skip(f"no shared images at {SUBSET}")
    folder = tmp_path_factory.mktemp("real")
    for path in sorted((SUBSET / "query").glob("*.jpg"))[:24]:
        (folder / path.name).symlink_to(path)
    return folder


def trained(tiny_config, tmp_path_factory, name: str, *overrides: str) -> Path:
    """One epoch on the tiny set, then attention made to matter: alpha 0.5.

    With the paper's c = 1 the query and key convolutions are also scaled by 1/4 (logits 1/16):
    after one epoch the attention on real crops is already so sharp that a landmark's weight
    on itself lands anywhere from 1e-5 (24 Newton-Schulz steps) to 1e-11 (refused, past 40)
    depending on the machine's float reductions, and this test is about an exact export of
    a model that has one, not about where one epoch happens to land.
    """
    out = tmp_path_factory.mktemp(name) / "run"
    path = fit(tiny_config("train.epochs=1", *overrides), out, progress=False)
    state = load_checkpoint(path)
    weights = dict(state.model)
    paper_weight = "attention.landmark_weight=1" in overrides
    for key in list(weights):
        if key.endswith(".alpha"):
            weights[key] = torch.tensor(0.5)
        if paper_weight and key.endswith(("query.weight", "query.bias", "key.weight", "key.bias")):
            weights[key] = weights[key] / 4
    save_checkpoint(path, replace(state, model=weights))
    return path


# (PCB without attention is not here: its modules are the attention rows' minus the attention,
# and tests/test_cli_mobilenet.py exports a trunk without attention to the same bar.)
MODELS = {
    "pcb-sa": ("attention.kind=sa", "attention.groups=1"),
    "pcb-csa": ("attention.kind=csa",),
    "pcb-csalr-c1": ("attention.kind=csalr", "attention.landmark_weight=1"),
    "pcb-csalr-c2": ("attention.kind=csalr", "attention.landmark_weight=2"),
    # the strong baseline's global head with BNNeck (bot-csalr's recipe), after-BN feature
    "global-csalr": (
        "model.head=global",
        "eval.feature=h",
        "data.sampler=identity",
        "data.instances=4",
        "train.triplet=hard",
        "train.label_smoothing=0.1",
        "attention.kind=csalr",
        "attention.landmark_weight=2",
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_config, tmp_path_factory) -> dict[str, Path]:
    return {
        name: trained(tiny_config, tmp_path_factory, name, *sets) for name, sets in MODELS.items()
    }


@pytest.fixture(scope="module")
def exported(checkpoints, real_images, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each model exported once (an export costs ~20 CPU-seconds): (model.onnx, report).

    The demo's CSALR (c = 2) is checked on the checkpoint's own query images, as `reidkit
    export` does by default; the others on the real crops.
    """
    if not SUBSET.is_dir():
        pytest.skip(f"no shared images at {SUBSET}")
    result = {}
    for name, checkpoint in checkpoints.items():
        out = tmp_path_factory.mktemp(f"onnx-{name}") / "model.onnx"
        images = None if name == "pcb-csalr-c2" else real_images
        result[name] = (out, export_onnx(checkpoint, out, check_images=images))
    return result


def onnx_features(path: Path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


def torch_features(checkpoint: Path, images: torch.Tensor) -> np.ndarray:
    model, state = load_model(checkpoint)
    with torch.no_grad():
        return embed_images(model, images, feature=state.config.eval.feature).numpy()


def batches_of(folder_or_rows, config, batch_size: int = 24) -> torch.Tensor:
    from reidkit.engine.search import folder_images

    rows = folder_images(folder_or_rows) if isinstance(folder_or_rows, Path) else folder_or_rows
    loader = build_loader(
        rows.assign(split="query"), "query", config.data, batch_size=64, train=False
    )
    return torch.cat([batch[0] for batch in loader])


@needs_subset
@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_features_match_pytorch_on_real_images(
    name, checkpoints, exported, real_images
):
    out, report = exported[name]
    assert out.is_file() and report.path == out
    config = load_checkpoint(checkpoints[name]).config
    images = batches_of(real_images, config)  # 24 real crops at the model's input size
    got, want = onnx_features(out, images), torch_features(checkpoints[name], images)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    cosines = (got * want).sum(axis=1)
    assert cosines.min() >= MIN_COSINE, cosines.min()
    if "csalr" in name:  # the attention did matter: without it the features differ
        model, _ = load_model(checkpoints[name])
        for module in model.attention.values():
            module.alpha.data.zero_()
        with torch.no_grad():
            plain = embed_images(model, images).numpy()
        assert (plain * want).sum(axis=1).min() < 0.999


@needs_subset
def test_batch_size_is_dynamic_and_metadata_describes_the_input(checkpoints, exported, real_images):
    out, report = exported["pcb-csalr-c2"]
    config = load_checkpoint(checkpoints["pcb-csalr-c2"]).config
    images = batches_of(real_images, config)
    for n in (1, 7):
        assert onnx_features(out, images[:n]).shape[0] == n
    metadata = read_metadata(out)
    assert metadata == report.metadata
    assert f"3 x {config.data.height} x {config.data.width}" in metadata["input"]
    assert "0.485" in metadata["preprocessing"] and "0.229" in metadata["preprocessing"]
    assert metadata["feature"] == "g" and metadata["flip"] == "false"
    assert metadata["csalr_solve"].startswith("5 Newton-Schulz steps")  # c = 2: any input
    assert report.solve_steps == 5


@needs_subset
def test_gallery_top10_rankings_are_identical(checkpoints, exported, tiny_root):
    # The demo's setting: smoke's CSALR with c = 2, on the synthetic gallery.
    checkpoint = checkpoints["pcb-csalr-c2"]
    out, report = exported["pcb-csalr-c2"]  # checked on the checkpoint's own query images
    assert report.checked_images > 0 and report.min_cosine >= MIN_COSINE
    assert report.solve_steps == 5 and report.min_self_weight is None  # c = 2: any input
    config = load_checkpoint(checkpoint).config
    frame = read_manifest(manifest_path(tiny_root, "tiny"))
    query = batches_of(frame[frame["split"] == "query"], config)
    gallery = batches_of(frame[frame["split"] == "gallery"], config)
    ranked = {}
    for name, embed in (("onnx", lambda x: onnx_features(out, x)), ("torch", None)):
        q = embed(query) if embed else torch_features(checkpoint, query)
        g = embed(gallery) if embed else torch_features(checkpoint, gallery)
        ranked[name] = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ranked["onnx"], ranked["torch"])


def test_paper_weight_model_too_near_singular_is_refused_and_writes_nothing(checkpoints, tmp_path):
    state = load_checkpoint(checkpoints["pcb-csalr-c1"])
    weights = {
        key: value * 200 if key.endswith(("query.weight", "key.weight")) else value
        for key, value in state.model.items()
    }  # logits 40,000x: landmarks attend away from themselves
    sharp = tmp_path / "sharp.pt"
    save_checkpoint(sharp, replace(state, model=weights))
    out = tmp_path / "model.onnx"
    with pytest.raises(ConfigError, match=r"singular.*landmark_weight=2"):
        export_onnx(sharp, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharp.pt"]


def test_paper_weight_model_without_images_says_what_to_give(checkpoints, tmp_path):
    state = load_checkpoint(checkpoints["pcb-csalr-c1"])
    nowhere = replace(state.config, data=replace(state.config.data, root=str(tmp_path / "none")))
    lost = tmp_path / "lost.pt"
    save_checkpoint(lost, replace(state, config=nowhere))
    with pytest.raises(ConfigError, match="--check-images FOLDER"):
        export_onnx(lost, tmp_path / "model.onnx")


def test_missing_onnx_names_the_packages_for_this_interpreter(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(ExportMissingError) as err:
        export_onnx(checkpoints["pcb-sa"], tmp_path / "model.onnx")
    # `pip install 'reidkit[export]'` would fetch another project's reidkit from the index
    assert f"{sys.executable} -m pip install onnx onnxscript onnxruntime" in str(err.value)
    assert "'reidkit[export]'" not in str(err.value)
