"""ResNet trunk: torchvision key compatibility, map sizes, ImageNet weight loading (offline)."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import pytest
import torch

from reidkit.errors import CheckpointError, ConfigError
from reidkit.models import imagenet
from reidkit.models.resnet import (
    RESNETS,
    build_resnet,
    load_imagenet_weights,
    resnet18,
    resnet34,
    resnet50,
)

# ---- torchvision's state-dict layout, written out from its architecture --------------------


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def torchvision_keys(bottleneck: bool, layers: list[int]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's resnet18/34/50 state dict (ImageNet, 1000 classes)."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    expansion = 4 if bottleneck else 1
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip(layers, [64, 128, 256, 512], strict=True), start=1):
        out_ch = width * expansion
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            cin = in_ch if b == 0 else out_ch
            if bottleneck:
                keys[f"{p}.conv1.weight"] = (width, cin, 1, 1)
                keys.update(_bn(f"{p}.bn1", width))
                keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
                keys.update(_bn(f"{p}.bn2", width))
                keys[f"{p}.conv3.weight"] = (out_ch, width, 1, 1)
                keys.update(_bn(f"{p}.bn3", out_ch))
            else:
                keys[f"{p}.conv1.weight"] = (width, cin, 3, 3)
                keys.update(_bn(f"{p}.bn1", width))
                keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
                keys.update(_bn(f"{p}.bn2", width))
            # torchvision adds a projection shortcut only where the shape changes: the first
            # block of every stage, except ResNet-18/34's stage 1 (64 -> 64, stride 1).
            if b == 0 and (stage > 1 or bottleneck):
                keys[f"{p}.downsample.0.weight"] = (out_ch, cin, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", out_ch))
        in_ch = out_ch
    keys["fc.weight"] = (1000, 512 * expansion)
    keys["fc.bias"] = (1000,)
    return keys


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_resnet50_state_dict_matches_torchvision_keys_and_shapes():
    with torch.device("meta"):  # shapes only: no 25M-parameter initialisation
        model = resnet50()
    expected = torchvision_keys(bottleneck=True, layers=[3, 4, 6, 3])
    assert _shapes(model) == expected
    assert list(model.state_dict()) == list(expected)  # same order as torchvision's too
    assert len(expected) == 320
    # torchvision's published parameter count for resnet50
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def test_resnet18_and_34_state_dicts_match_torchvision_keys_and_shapes():
    with torch.device("meta"):
        r18, r34 = resnet18(), resnet34()
    assert _shapes(r18) == torchvision_keys(bottleneck=False, layers=[2, 2, 2, 2])
    assert _shapes(r34) == torchvision_keys(bottleneck=False, layers=[3, 4, 6, 3])
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    assert sum(p.numel() for p in r34.parameters()) == 21_797_672


def test_last_stride_changes_strides_not_keys():
    with torch.device("meta"):
        plain, pcb = resnet50(last_stride=2), resnet50(last_stride=1)
    assert _shapes(plain) == _shapes(pcb)
    assert pcb.layer4[0].conv2.stride == (1, 1)
    assert pcb.layer4[0].downsample[0].stride == (1, 1)
    assert plain.layer4[0].conv2.stride == (2, 2)
    assert plain.layer4[0].downsample[0].stride == (2, 2)
    # v1.5: the stride sits on the 3x3 conv, not on the first 1x1
    assert plain.layer2[0].conv1.stride == (1, 1)
    assert plain.layer2[0].conv2.stride == (2, 2)


def _stage_sizes(model, height: int, width: int) -> list[tuple[int, int, int]]:
    x = torch.empty(1, 3, height, width, device="meta")
    sizes = []
    x = model.stem(x)
    for stage in model.stages:
        x = stage(x)
        sizes.append(tuple(x.shape[1:]))
    assert tuple(model(torch.empty(1, 3, height, width, device="meta")).shape[1:]) == sizes[-1]
    return sizes


def test_resnet50_map_sizes_for_pcb_inputs():
    with torch.device("meta"):
        pcb, plain = resnet50(last_stride=1).eval(), resnet50(last_stride=2).eval()
    assert pcb.out_channels == (256, 512, 1024, 2048)
    assert _stage_sizes(pcb, 384, 128) == [
        (256, 96, 32),
        (512, 48, 16),
        (1024, 24, 8),
        (2048, 24, 8),
    ]
    assert _stage_sizes(pcb, 256, 128)[-1] == (2048, 16, 8)
    assert _stage_sizes(plain, 384, 128)[-1] == (2048, 12, 4)


def test_resnet18_runs_on_real_tensors_with_declared_channels():
    model = resnet18(last_stride=1).eval()
    assert model.out_channels == (64, 128, 256, 512)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 64))
    assert out.shape == (2, 512, 8, 4)
    assert torch.isfinite(out).all()


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ConfigError, match="resnet18, resnet34, resnet50"):
        build_resnet("resnet101")
    assert set(RESNETS) == {"resnet18", "resnet34", "resnet50"}


# ---- ImageNet weight loading ---------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub folder, so no test reads the machine's real cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def _no_network(url: str, destination: Path) -> bool:
    return False


def _must_not_fetch(url: str, destination: Path) -> bool:
    raise AssertionError(f"tried to fetch {url}")


def test_loading_copies_every_tensor_except_fc(tmp_path):
    source = resnet18()
    for buffer in source.buffers():  # make BN statistics distinguishable from a fresh model
        buffer.add_(3)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    target = resnet18(last_stride=1)
    fc_before = target.fc.weight.clone()
    assert load_imagenet_weights(target, path, "resnet18") == path
    got, want = target.state_dict(), source.state_dict()
    for key, value in want.items():
        if key.startswith("fc."):
            continue
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert torch.equal(target.fc.weight, fc_before)  # fc is not reidkit's: left alone


def test_loading_accepts_a_file_without_num_batches_tracked(tmp_path):
    source = resnet18()
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    target = resnet18()
    load_imagenet_weights(target, tmp_path / "old.pth", "resnet18")
    assert torch.equal(target.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.pop("layer1.0.conv1.weight"), "missing 1 key(s): layer1.0.conv1.weight"),
        (
            lambda s: s.update({"layer5.0.conv1.weight": torch.zeros(1)}),
            "unexpected 1 key(s): layer5.0.conv1.weight",
        ),
        (
            lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}),
            "conv1.weight (64, 3, 3, 3) vs (64, 3, 7, 7)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatched_file_fails_naming_the_keys(tmp_path, edit, needle):
    state = resnet18().state_dict()
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    target = resnet18()
    before = target.conv1.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_imagenet_weights(target, tmp_path / "bad.pth", "resnet18")
    assert needle in str(info.value)
    assert torch.equal(target.conv1.weight, before)  # nothing half-loaded


def test_wrong_architecture_file_reports_count_and_first_keys(tmp_path):
    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    with torch.device("meta"):
        target = resnet50()
    with pytest.raises(CheckpointError, match=r"missing \d+ key\(s\): .* and \d+ more"):
        load_imagenet_weights(target, tmp_path / "r18.pth", "resnet50")


def test_pickled_object_file_fails_cleanly_with_its_path(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)  # not allowed by weights_only
    with pytest.raises(CheckpointError, match="object.pth is not a loadable"):
        load_imagenet_weights(resnet18(), path, "resnet18")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth is not a loadable"):
        load_imagenet_weights(resnet18(), tmp_path / "junk.pth", "resnet18")


def test_file_that_is_not_a_state_dict_fails(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a torchvision ResNet state dict"):
        load_imagenet_weights(resnet18(), tmp_path / "list.pth", "resnet18")


def test_explicit_path_that_does_not_exist_fails(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_imagenet_weights(resnet18(), tmp_path / "nope.pth", "resnet18", fetch=_must_not_fetch)


def test_hub_cache_file_is_found_without_network(hub):
    source = resnet18()
    hub.mkdir(parents=True)
    torch.save(source.state_dict(), hub / "resnet18-f37072fd.pth")
    target = resnet18()
    used = load_imagenet_weights(target, None, "resnet18", fetch=_must_not_fetch)
    assert used == hub / "resnet18-f37072fd.pth"
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_resnet50_v2_file_is_used_when_v1_is_absent(hub):
    hub.mkdir(parents=True)
    (hub / "resnet50-11ad3fa6.pth").write_bytes(b"placeholder")
    # The file is junk, but the error shows which file the lookup chose.
    with torch.device("meta"):
        model = resnet50()
    with pytest.raises(CheckpointError, match="resnet50-11ad3fa6.pth is not a loadable"):
        load_imagenet_weights(model, None, "resnet50", fetch=_must_not_fetch)


def test_missing_file_offline_is_one_line_naming_file_folder_and_fix(hub, monkeypatch):
    calls = []

    def offline(url: str, destination: Path) -> bool:
        calls.append((url, destination))
        return False

    with pytest.raises(CheckpointError) as info:
        load_imagenet_weights(resnet18(), None, "resnet18", fetch=offline)
    message = str(info.value)
    assert "\n" not in message
    assert "resnet18-f37072fd.pth" in message
    assert str(hub) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--set model.pretrained=false" in message
    assert calls == [
        ("https://download.pytorch.org/models/resnet18-f37072fd.pth", hub / "resnet18-f37072fd.pth")
    ]

    # The default network step is imagenet's `fetch_weights`, looked up at call time.
    monkeypatch.setattr(imagenet, "fetch_weights", _no_network)
    with pytest.raises(CheckpointError, match="resnet50-0676ba61.pth"):
        load_imagenet_weights(resnet18(), None, "resnet50")


def test_fetched_file_is_loaded(hub):
    source = resnet18()

    def fake_download(url: str, destination: Path) -> bool:
        destination.parent.mkdir(parents=True, exist_ok=True)
        torch.save(source.state_dict(), destination)
        return True

    target = resnet18()
    load_imagenet_weights(target, None, "resnet18", fetch=fake_download)
    assert torch.equal(target.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_fetch_weights_downloads_nothing_when_host_is_unreachable(tmp_path, monkeypatch):
    # No real network: the probe is replaced by one that reports every host as unreachable.
    monkeypatch.setattr(imagenet, "_reachable", lambda host, *a, **k: False)
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download")
    )
    assert imagenet.fetch_weights("https://example.invalid/x.pth", tmp_path / "x.pth") is False
    assert not (tmp_path / "x.pth").exists()


def test_reachability_probe_is_bounded_even_when_the_lookup_stalls(monkeypatch):
    # A stalled name lookup (no resolver) must not hold the caller past the timeout.
    release = threading.Event()

    def stalled_connection(*args, **kwargs):
        release.wait(10)
        raise OSError("lookup stalled")

    monkeypatch.setattr(imagenet.socket, "create_connection", stalled_connection)
    start = time.perf_counter()
    try:
        assert imagenet._reachable("download.pytorch.org", timeout=0.2) is False
        assert time.perf_counter() - start < 2
    finally:
        release.set()  # let the abandoned probe thread finish
