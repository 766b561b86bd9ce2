"""Trunk + attention after chosen stages + deep supervision + PCB/RPP or global head.

The framework of Chen et al., "Compressed Self-Attention for Deep Metric Learning with
Low-Rank Approximation" (IJCAI 2020), figure 3 and eq. 18, on PCB / PCB-RPP (Sun et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from reidkit.errors import ConfigError
from reidkit.models import imagenet, mobilenet, resnet
from reidkit.models.attention import CSALR, build_attention
from reidkit.models.global_head import GlobalHead
from reidkit.models.imagenet import WeightSource
from reidkit.models.mobilenet import MobileNetV2
from reidkit.models.pcb import HeadOutput, PCBHead, RefinedPartPooling
from reidkit.models.resnet import ResNet

if TYPE_CHECKING:  # models/ must not import config at run time (DESIGN.md, Layout)
    from reidkit.config import RunConfig

__all__ = [
    "TRUNKS",
    "NetOutput",
    "ReidNet",
    "TrunkSpec",
    "build_model",
    "build_trunk",
    "load_trunk_weights",
]

Trunk = ResNet | MobileNetV2  # stem(x), stages (four), out_channels, forward(x)


@dataclass(frozen=True)
class TrunkSpec:
    """How to build one `model.arch` and where its ImageNet weights come from."""

    build: Callable[..., Trunk]  # keyword `last_stride`
    weights: Callable[[], WeightSource]


# One explicit table: `model.arch` -> trunk. Every trunk has the same contract (a stem, four
# stages at strides 4 / 8 / 16 / 32, `out_channels` per stage, `last_stride`), so attention,
# deep supervision and heads read their widths from the built trunk, never from the name.
TRUNKS: dict[str, TrunkSpec] = {
    "resnet18": TrunkSpec(resnet.resnet18, lambda: resnet.weight_source("resnet18")),
    "resnet34": TrunkSpec(resnet.resnet34, lambda: resnet.weight_source("resnet34")),
    "resnet50": TrunkSpec(resnet.resnet50, lambda: resnet.weight_source("resnet50")),
    "mobilenet_v2": TrunkSpec(mobilenet.mobilenet_v2, mobilenet.weight_source),
}


def build_trunk(arch: str, *, last_stride: int = 2) -> Trunk:
    """The trunk named `arch` (a key of TRUNKS), with random weights."""
    if arch not in TRUNKS:
        raise ConfigError(f"unknown model.arch {arch!r}; choose one of {', '.join(TRUNKS)}")
    return TRUNKS[arch].build(last_stride=last_stride)


def load_trunk_weights(
    trunk: Trunk,
    arch: str,
    path: str | Path | None = None,
    *,
    fetch: Callable[[str, Path], bool] | None = None,
) -> Path:
    """Copy `arch`'s ImageNet weights into `trunk`, strictly by name (`path`, else the file in
    torch's hub cache, fetched when reachable); returns the file used."""
    if arch not in TRUNKS:
        raise ConfigError(f"unknown model.arch {arch!r}; choose one of {', '.join(TRUNKS)}")
    return imagenet.load_imagenet_weights(trunk, path, TRUNKS[arch].weights(), fetch=fetch)


class NetOutput(NamedTuple):
    """What ReidNet returns, in training and evaluation alike; the caller picks the field.

    A global head gives P = 1: `part_features` is the pooled feature before BNNeck (what the
    triplet loss reads), `reduced_features` the one after it (C wide, the classifier's input).
    """

    part_features: Tensor  # (B, P, C) pooled parts `g`, C the trunk's last width (R50: 2048)
    reduced_features: Tensor  # (B, P, reduced) `h` after reduction + BN + ReLU
    part_logits: Tensor  # (B, P, num_ids)
    aux_logits: tuple[Tensor, ...]  # one (B, num_ids) per attention module; () without DS


class ReidNet(nn.Module):
    """Trunk with attention modules after the given stages, deep supervision, PCB/RPP head.

    `attention` maps a stage (1-4) to a module whose `forward(x)` returns `(out, fused)`,
    `out = x + alpha * fused` with x's shape. With `deep_supervision`, each module gets a
    branch `Linear(GAP(x * fused))` -> (B, num_ids) logits (eq. 18: the product with the
    module's input, taken before the gated residual). `recompute` re-runs each attention
    module (and its deep-supervision pooling) in backward instead of keeping its
    activations: less memory for more time, same gradients.

    A ResNet trunk's unused ImageNet `fc` is dropped: its 2M parameters would never get a
    gradient, which DistributedDataParallel refuses, and would only pad every checkpoint
    (MobileNetV2 is built without its classifier).
    """

    def __init__(
        self,
        trunk: Trunk,
        head: PCBHead | GlobalHead,
        *,
        attention: Mapping[int, nn.Module] | None = None,
        deep_supervision: bool = True,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        attention = dict(attention or {})
        bad = sorted(s for s in attention if s not in (1, 2, 3, 4))
        if bad:
            raise ConfigError(f"attention stages {bad} do not exist; choose from 1-4")
        if head.in_channels != trunk.out_channels[-1]:
            raise ConfigError(
                f"the head expects {head.in_channels} channels; "
                f"the trunk gives {trunk.out_channels[-1]}"
            )
        if isinstance(trunk, ResNet):
            trunk.fc = nn.Identity()
        self.trunk = trunk
        # String keys because ModuleDict needs them; state-dict names read `attention.2.*`.
        self.attention = nn.ModuleDict({str(s): attention[s] for s in sorted(attention)})
        self.aux_classifiers = nn.ModuleDict(
            {
                str(s): nn.Linear(trunk.out_channels[s - 1], head.num_ids)
                for s in sorted(attention)
                if deep_supervision
            }
        )
        self.head = head
        self.recompute = recompute
        self._frozen_for_rpp = False

    @property
    def head_kind(self) -> str:
        """ "global", "rpp" or "pcb": the head the weights belong to (saved in checkpoints)."""
        if isinstance(self.head, GlobalHead):
            return "global"
        return "rpp" if self.head.is_rpp else "pcb"

    @property
    def attention_stages(self) -> tuple[int, ...]:
        """The stages followed by an attention module, ascending."""
        return tuple(int(s) for s in self.attention)

    def _attend(self, key: str, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """One attention module, plus GAP(x * fused) when it has a deep-supervision branch."""
        out, fused = self.attention[key](x)  # (B, C, H, W) each
        if key not in self.aux_classifiers:
            return out, None
        return out, (x * fused).mean(dim=(2, 3))  # eq. 18, before the gated residual: (B, C)

    def forward_features(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(B, 3, H, W) images -> ((B, C, h, w) last-stage map, aux logits per module)."""
        x = self.trunk.stem(x)
        aux: list[Tensor] = []
        for stage, layer in enumerate(self.trunk.stages, start=1):
            x = layer(x)
            key = str(stage)
            if key not in self.attention:
                continue
            if self.recompute and self.training and torch.is_grad_enabled():
                out, pooled = checkpoint(self._attend, key, x, use_reentrant=False)
            else:
                out, pooled = self._attend(key, x)
            if pooled is not None:
                aux.append(self.aux_classifiers[key](pooled))  # (B, num_ids)
            x = out
        return x, tuple(aux)

    def forward_head(self, fmap: Tensor) -> HeadOutput:
        """(B, C, h, w) last-stage map -> pooled parts, reduced parts, part logits."""
        return self.head(fmap)

    def forward(self, x: Tensor) -> NetOutput:
        """(B, 3, H, W) images -> NetOutput."""
        fmap, aux = self.forward_features(x)
        return NetOutput(*self.forward_head(fmap), aux_logits=aux)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"trunk": the ResNet, "attention": the attention modules, "new": deep-supervision
        classifiers and the head}.

        Every parameter is in exactly one group, so each can get its own learning rate: the
        paper trains the pretrained trunk, which the attention modules enhance, at 0.1x the
        base rate. Frozen parameters are included; they have no gradient, so SGD skips them.
        """
        trunk = list(self.trunk.parameters())
        attention = list(self.attention.parameters())
        taken = {id(p) for p in trunk + attention}
        return {
            "trunk": trunk,
            "attention": attention,
            "new": [p for p in self.parameters() if id(p) not in taken],
        }

    def landmark_margins(self) -> dict[int, Tensor]:
        """Stage -> the smallest diagonal margin of the CSALR landmark matrices in the last
        training batch (:attr:`CSALR.landmark_margin`); empty without CSALR modules."""
        return {
            int(stage): module.landmark_margin
            for stage, module in self.attention.items()
            if isinstance(module, CSALR) and module.landmark_margin is not None
        }

    # ---- PCB -> RPP ------------------------------------------------------------------------

    def convert_to_rpp(self) -> RefinedPartPooling:
        """Swap the head's stripe pooling for a new RPP part classifier; all else is kept."""
        return self.head.convert_to_rpp()

    def freeze_all_but_part_classifier(self) -> None:
        """RPP's first step: train only the part classifier, everything else fixed.

        Frozen parameters stop requiring gradients, and frozen modules stay in eval mode
        even under `train()` (BN running statistics and dropout would otherwise still change
        the "fixed" network). Undo with `unfreeze_all()`. The flag is not saved in the state
        dict: a resumed run calls this again.
        """
        if not isinstance(self.head.pooling, RefinedPartPooling):
            raise ConfigError("freezing for RPP needs an RPP head; call convert_to_rpp() first")
        keep = self.head.pooling.classifier
        kept = {id(p) for p in keep.parameters()}
        for param in self.parameters():
            param.requires_grad_(id(param) in kept)
        self._frozen_for_rpp = True
        self.train(self.training)

    def unfreeze_all(self) -> None:
        """Make every parameter trainable (but a head's always-frozen ones, BNNeck's bias) and
        every module follow `train()` again."""
        frozen = {id(p) for p in getattr(self.head, "frozen_parameters", list)()}
        for param in self.parameters():
            param.requires_grad_(id(param) not in frozen)
        self._frozen_for_rpp = False
        self.train(self.training)

    def train(self, mode: bool = True) -> ReidNet:
        """nn.Module.train, except that modules frozen for RPP stay in eval mode."""
        super().train(mode)
        if mode and self._frozen_for_rpp:
            keep = self.head.pooling
            # self, head and pooling only contain the part classifier; every other module
            # is frozen as a whole.
            containers = {id(self), id(self.head), id(keep)}
            for module in self.modules():
                if id(module) not in containers and module is not keep.classifier:
                    module.training = False
        return self


def build_model(config: RunConfig, num_ids: int) -> ReidNet:
    """ReidNet from `config.model` and `config.attention`, with `num_ids` training identities.

    Loads the arch's ImageNet weights into the trunk when `config.model.pretrained`
    (`config.model.weights`, or torch's hub cache when empty; see TRUNKS). `model.head =
    "rpp"` builds the RPP head directly (for loading an RPP checkpoint); a PCB -> RPP run
    builds PCB and calls `convert_to_rpp()` when its RPP stage starts.
    """
    m, a = config.model, config.attention
    trunk = build_trunk(m.arch, last_stride=m.last_stride)
    if m.pretrained:
        load_trunk_weights(trunk, m.arch, m.weights or None)
    modules: dict[int, nn.Module] = {}
    if a.kind != "none":
        for stage in a.stages:
            if stage not in (1, 2, 3, 4):
                raise ConfigError(f"attention.stages: stage {stage} does not exist; choose 1-4")
            modules[stage] = build_attention(
                a.kind, trunk.out_channels[stage - 1], **attention_options(config)
            )
    head: PCBHead | GlobalHead
    if m.head == "global":
        head = GlobalHead(trunk.out_channels[-1], num_ids=num_ids)
    else:
        head = PCBHead(
            trunk.out_channels[-1],
            parts=m.parts,
            reduced=m.reduced,
            num_ids=num_ids,
            dropout=m.dropout,
            shared_reduction=m.shared_reduction,
        )
    net = ReidNet(
        trunk,
        head,
        attention=modules,
        deep_supervision=a.deep_supervision,
        recompute=a.recompute,
    )
    if m.head == "rpp":
        net.convert_to_rpp()
    elif m.head not in ("pcb", "global"):
        raise ConfigError(f"unknown model.head {m.head!r}; choose pcb, rpp or global")
    return net


def attention_options(config: RunConfig) -> dict[str, object]:
    """The `attention.*` settings the configured kind of module takes, as its keywords."""
    a = config.attention
    common = {"groups": a.groups, "qk_ratio": a.qk_ratio}
    if a.kind == "csalr":
        return {
            **common,
            "grid": tuple(a.grid),
            "landmark_weight": a.landmark_weight,
            "projection": a.projection,
        }
    if a.kind == "csa":
        return {**common, "bases": a.bases}
    return common
