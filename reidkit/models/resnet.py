"""ResNet-18/34/50 whose state-dict names match torchvision's (He et al., CVPR 2016; v1.5).

reidkit does not depend on torchvision (its wheels need the CUDA build of torch), so the trunk
is written here and loads torchvision's ImageNet checkpoint files by their key names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from reidkit.errors import ConfigError
from reidkit.models import imagenet
from reidkit.models.imagenet import WEIGHTS_URL, WeightSource

__all__ = [
    "IMAGENET_FILES",
    "RESNETS",
    "WEIGHTS_URL",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_resnet",
    "load_imagenet_weights",
    "resnet18",
    "resnet34",
    "resnet50",
    "weight_source",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual (ResNet-18/34); output has `width` channels."""

    expansion = 1

    def __init__(
        self, in_channels: int, width: int, *, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a residual (ResNet-50); output has `4 * width` channels.

    The stride sits on the 3x3 conv (torchvision's "v1.5"), which is what its ImageNet
    weights were trained with.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, *, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk with torchvision's parameter names, run stage by stage.

    `stem(x)` then `layer1` ... `layer4` (also listed in `stages`) give the stage maps, so
    attention modules can be inserted between stages; `out_channels[i]` is the width of
    stage `i + 1`. `forward` returns the last stage's map (B, C, H, W). `fc` exists only so
    the state dict matches torchvision's checkpoints; reidkit never calls it.

    `last_stride=1` removes the last stage's downsampling (layer4[0] conv2 and its shortcut),
    as PCB does: a 384x128 input then gives a 24x8 map instead of 12x4.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        last_stride: int = 2,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ConfigError(f"last_stride must be 1 or 2, got {last_stride}")
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        strides = (1, 2, 2, last_stride)
        in_channels = 64
        for index, (blocks, width, stride) in enumerate(zip(layers, widths, strides, strict=True)):
            layer = self._make_layer(block, in_channels, width, blocks, stride)
            self.add_module(f"layer{index + 1}", layer)
            in_channels = width * block.expansion
        self.out_channels: tuple[int, ...] = tuple(w * block.expansion for w in widths)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck],
        in_channels: int,
        width: int,
        blocks: int,
        stride: int,
    ) -> nn.Sequential:
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        modules = [block(in_channels, width, stride=stride, downsample=downsample)]
        modules += [block(out_channels, width) for _ in range(blocks - 1)]
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        # torchvision's defaults (without zero-initialising the last BN of each block), so a
        # trunk trained from scratch starts where a torchvision one would.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def stages(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential, nn.Sequential]:
        """`layer1` ... `layer4`, in order."""
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def stem(self, x: Tensor) -> Tensor:
        """conv1 + bn1 + relu + maxpool: (B, 3, H, W) -> (B, 64, H/4, W/4)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) image batch -> (B, out_channels[-1], h, w) last-stage map."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


def resnet18(*, last_stride: int = 2) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2], 512-channel output."""
    return ResNet(BasicBlock, (2, 2, 2, 2), last_stride=last_stride)


def resnet34(*, last_stride: int = 2) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3], 512-channel output."""
    return ResNet(BasicBlock, (3, 4, 6, 3), last_stride=last_stride)


def resnet50(*, last_stride: int = 2) -> ResNet:
    """ResNet-50 (v1.5): Bottleneck x [3, 4, 6, 3], 2048-channel output."""
    return ResNet(Bottleneck, (3, 4, 6, 3), last_stride=last_stride)


RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build_resnet(arch: str, *, last_stride: int = 2) -> ResNet:
    """The ResNet named `arch` (a key of RESNETS); an unknown name lists the valid ones."""
    if arch not in RESNETS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(RESNETS)}")
    return RESNETS[arch](last_stride=last_stride)


# torchvision's ImageNet checkpoint files, preferred first. For ResNet-50 the V1 weights
# (76.1% top-1) are the ones PCB and the paper started from; V2 (80.9%, trained with a
# longer recipe) has the same keys and is accepted when it is the file at hand.
IMAGENET_FILES: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet34": ("resnet34-b627a593.pth",),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
}


def weight_source(arch: str) -> WeightSource:
    """Where torchvision's ImageNet file for `arch` is looked for and fetched from."""
    if arch not in IMAGENET_FILES:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(IMAGENET_FILES)}")
    name = IMAGENET_FILES[arch][0]
    url = WEIGHTS_URL.format(file=name)
    return WeightSource(
        arch=arch,
        family="torchvision ResNet",
        files=IMAGENET_FILES[arch],
        download=url,
        by_hand=f"{name} (download it elsewhere from {url})",
        ignored=("fc.",),  # reidkit's heads replace the ImageNet classifier
    )


def load_imagenet_weights(
    model: ResNet,
    path: str | Path | None,
    arch: str,
    *,
    fetch: Callable[[str, Path], bool] | None = None,
) -> Path:
    """Copy a torchvision ImageNet checkpoint into `model`; returns the file that was used.

    `path=None` looks for torchvision's file name in `torch.hub.get_dir()/checkpoints` and,
    when absent, downloads it there if the host answers within a few seconds
    (`reidkit.models.imagenet.load_imagenet_weights` says how). `fc.*` is ignored on both
    sides (reidkit's heads replace it); any other missing or unexpected key, or a shape
    mismatch, fails with the key names.
    """
    return imagenet.load_imagenet_weights(model, path, weight_source(arch), fetch=fetch)
