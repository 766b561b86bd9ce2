"""PCB part head and RPP refined part pooling (Sun et al., "Beyond Part Models", ECCV 2018)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reidkit.errors import ConfigError

__all__ = ["HeadOutput", "PCBHead", "PartLinear", "RefinedPartPooling", "StripePooling"]


class StripePooling(nn.Module):
    """PCB's uniform partition: `parts` horizontal stripes, each average pooled.

    (B, C, H, W) -> (B, parts, C). When `parts` divides H (PCB: 24 rows, 6 parts) stripe i is
    the plain mean of rows [i*H/P, (i+1)*H/P). Otherwise adaptive average pooling semantics
    apply: stripe i covers rows floor(i*H/P) to ceil((i+1)*H/P) - 1, so neighbouring stripes
    share a boundary row instead of some rows being dropped.
    """

    def __init__(self, parts: int) -> None:
        super().__init__()
        if parts < 1:
            raise ConfigError(f"parts must be at least 1, got {parts}")
        self.parts = parts

    def forward(self, fmap: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(fmap, (self.parts, 1))  # (B, C, P, 1)
        return pooled.squeeze(-1).transpose(1, 2)  # (B, P, C)


class RefinedPartPooling(nn.Module):
    """RPP: soft part assignment by a 1x1 part classifier, then per-part weighted averages.

    Each position x of the (B, C, H, W) map gets p_i(x) = softmax_i(classifier(f(x))) over the
    `parts` parts; part i is sum_x p_i(x) f(x) / sum_x p_i(x). Same call signature as
    StripePooling: (B, C, H, W) -> (B, parts, C).
    """

    def __init__(self, in_channels: int, parts: int) -> None:
        super().__init__()
        if parts < 1:
            raise ConfigError(f"parts must be at least 1, got {parts}")
        self.parts = parts
        self.classifier = nn.Conv2d(in_channels, parts, 1)
        # Small weights start every position near the uniform assignment: no random part
        # layout is imposed before the (frozen) PCB classifiers have had a say.
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def assignment(self, fmap: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, parts, H, W) part probabilities; they sum to 1 over parts."""
        return self.classifier(fmap).softmax(dim=1)

    def forward(self, fmap: Tensor) -> Tensor:
        prob = self.assignment(fmap)  # (B, P, H, W)
        weighted = torch.einsum("bphw,bchw->bpc", prob, fmap)  # (B, P, C)
        mass = prob.sum(dim=(2, 3)).unsqueeze(-1)  # (B, P, 1)
        # Softmax mass is positive, but it can underflow when a part claims no position.
        return weighted / mass.clamp_min(1e-12)


class PartLinear(nn.Module):
    """`parts` independent linear maps, one per part, run as one batched product.

    (B, parts, in_features) -> (B, parts, out_features). Equivalent to a separate 1x1 conv or
    nn.Linear per part (no weight is shared between parts), without a Python loop.
    `weight` is (parts, in_features, out_features); `bias` (parts, out_features) or None.
    Initialised per part as nn.Linear is.
    """

    def __init__(self, parts: int, in_features: int, out_features: int, *, bias: bool = True):
        super().__init__()
        self.parts, self.in_features, self.out_features = parts, in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(parts, in_features, out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.empty(parts, out_features)) if bias else None
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.einsum("bpi,pio->bpo", x, self.weight)  # (B, P, out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"parts={self.parts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class HeadOutput(NamedTuple):
    """What PCBHead returns, in training and evaluation alike."""

    part_features: Tensor  # (B, P, C) pooled parts `g`, before reduction
    reduced_features: Tensor  # (B, P, reduced) `h`: reduction + BN + ReLU
    part_logits: Tensor  # (B, P, num_ids)


class PCBHead(nn.Module):
    """PCB head: part pooling, dropout on the pooled parts, a 1x1 conv (C -> reduced) + BN +
    ReLU, and an identity classifier per part.

    `pooling` is StripePooling (PCB) or, after `convert_to_rpp()`, RefinedPartPooling (RPP);
    everything after pooling is the same module in both cases, which is what lets RPP start
    from a trained PCB. Dropout acts on the pooled vectors `g` before the reduction, where
    PCB's authors, torchreid and the CSALR authors' code put it.

    `shared_reduction`: one 1x1 conv + BN serves every part (both authors' codes; BN then
    pools its statistics over the parts), instead of one per part (the default; per-part
    reductions read about +2 R1 / +5 mAP in published reproductions). Classifiers are always
    per part.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        parts: int = 6,
        reduced: int = 256,
        num_ids: int,
        dropout: float = 0.5,
        shared_reduction: bool = False,
    ) -> None:
        super().__init__()
        if num_ids < 1 or reduced < 1:
            raise ConfigError(f"num_ids and reduced must be at least 1, got {num_ids}, {reduced}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.parts, self.reduced, self.num_ids = (
            in_channels,
            parts,
            reduced,
            num_ids,
        )
        self.shared_reduction = shared_reduction
        self.pooling: StripePooling | RefinedPartPooling = StripePooling(parts)
        self.dropout = nn.Dropout(dropout)
        # The conv is applied to pooled vectors, where a 1x1 conv is a linear map. No bias:
        # the BN right after it would cancel one.
        self.reduce: nn.Linear | PartLinear
        if shared_reduction:
            self.reduce = nn.Linear(in_channels, reduced, bias=False)
            self.bn = nn.BatchNorm1d(reduced)  # statistics over images and parts together
        else:
            self.reduce = PartLinear(parts, in_channels, reduced, bias=False)
            self.bn = nn.BatchNorm1d(parts * reduced)  # one channel per (part, unit)
        self.relu = nn.ReLU()
        self.classifier = PartLinear(parts, reduced, num_ids)
        # PCB's initialisation: He (fan-out) for the reduction, N(0, 0.001) classifiers.
        nn.init.normal_(self.reduce.weight, std=math.sqrt(2.0 / reduced))
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    @property
    def is_rpp(self) -> bool:
        """Whether the head pools with RPP's part classifier."""
        return isinstance(self.pooling, RefinedPartPooling)

    def convert_to_rpp(self) -> RefinedPartPooling:
        """Swap stripe pooling for a new RPP part classifier, in place; returns it.

        Only the pooling changes: reduction, BN and classifiers keep their (PCB-trained)
        weights. The new classifier is created on the head's device and dtype.
        """
        if self.is_rpp:
            raise ConfigError("the head already uses RPP; convert a PCB model only once")
        reference = self.reduce.weight
        pooling = RefinedPartPooling(self.in_channels, self.parts)
        self.pooling = pooling.to(device=reference.device, dtype=reference.dtype)
        return self.pooling

    def forward(self, fmap: Tensor) -> HeadOutput:
        """(B, C, H, W) trunk map -> HeadOutput."""
        parts = self.pooling(fmap)  # g: (B, P, C)
        reduced = self.reduce(self.dropout(parts))  # (B, P, R)
        batch = reduced.shape[0]
        if self.shared_reduction:
            reduced = self.bn(reduced.reshape(batch * self.parts, -1))  # (B*P, R)
        else:
            reduced = self.bn(reduced.reshape(batch, -1))  # (B, P*R)
        reduced = self.relu(reduced.view(batch, self.parts, -1))  # h: (B, P, R)
        return HeadOutput(parts, reduced, self.classifier(reduced))  # logits (B, P, num_ids)
